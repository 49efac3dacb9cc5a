"""Input validation shared by every implementation, so that all of them fail the same way."""

from __future__ import annotations

import torch

OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_images(images) -> tuple[int, int, int]:
    """Validate a uint8 NHWC RGB batch; returns (B, H, W)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (B, H, W, 3) NHWC as the loader delivers, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3) (NHWC, RGB), got {tuple(images.shape)}")
    b, h, w, _ = images.shape
    if b == 0:
        raise ValueError("images is an empty batch (B == 0)")
    if h == 0 or w == 0:
        raise ValueError(f"images have an empty spatial size {h}x{w}")
    return b, h, w


def check_dtype(dtype) -> None:
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"output dtype must be one of {OUTPUT_DTYPES}, got {dtype}")


def check_weak_input(h: int, w: int, spec) -> None:
    ph, pw = h + 2 * spec.padding, w + 2 * spec.padding
    if ph < spec.size or pw < spec.size:
        raise ValueError(
            f"input {h}x{w} with padding {spec.padding} is smaller than the crop size {spec.size}"
        )
    # torch's reflect padding cannot reflect further than the image is wide (symmetric: one more).
    if spec.padding_mode == "reflect" and spec.padding >= min(h, w):
        raise ValueError(f"reflect padding {spec.padding} needs an input larger than {spec.padding}, got {h}x{w}")
    if spec.padding_mode == "symmetric" and spec.padding > min(h, w):
        raise ValueError(f"symmetric padding {spec.padding} needs an input of at least {spec.padding}, got {h}x{w}")


def check_params_batch(params, batch: int, kind: str) -> None:
    if len(params) != batch:
        raise ValueError(f"{kind} params are for {len(params)} samples, images has {batch}")

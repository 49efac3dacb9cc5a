"""Helpers of the kernels tests: inputs, covering parameters, the torchvision oracle."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

from kernels import make_generator, sample_simclr_params


def random_images(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, generator=g)


def covering_simclr_params(batch: int, h: int, w: int, spec, seed: int = 0):
    """Random boxes and factors, but flags and op orders that cover every case.

    Orders step through the 24 permutations (so contrast and hue sit at every position
    in a batch of 8 already) and the flags follow patterns that decorrelate them, so a
    small batch exercises every branch instead of relying on chance.
    """
    p = sample_simclr_params(batch, h, w, spec, make_generator(seed, 0, 0, 0, "cpu"))
    i = torch.arange(batch)
    perms = torch.tensor(list(itertools.permutations(range(4))))
    return replace(
        p,
        flip=(i % 2) == 1,
        jitter=(i % 4) != 3,
        grayscale=(i % 5) == 2,
        blur=((i // 2) % 2) == 0,
        order=perms[(i * 7) % 24],
    )


def reference_kernel_size(sigma: float, spec) -> int:
    """The kernel size a per-sample torchvision call gets: the spec's fixed size, or 2*ceil(3*sigma)+1
    with the radius capped at size - 1 (reflect padding), written out here independently of kernels."""
    if spec.blur_kernel_size:
        return spec.blur_kernel_size
    return 2 * min(math.ceil(3.0 * sigma), spec.size - 1) + 1


def torchvision_simclr(image_hwc: torch.Tensor, spec, p, i: int) -> torch.Tensor:
    """Sample i through torchvision v2 with the same parameters, float32 CHW in [0, 1] (no normalise).

    Uses the v2 transform classes' own `transform(inpt, params)` where they exist, so the
    op-order semantics are torchvision's, not a re-implementation. The only added step is
    the clamp after the resize, the documented choice of the kernels.
    """
    interp = InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else InterpolationMode.BILINEAR
    x = F.to_dtype(image_hwc.permute(2, 0, 1), torch.float32, scale=True)
    rrc = T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=interp, antialias=False)
    box = dict(top=int(p.top[i]), left=int(p.left[i]), height=int(p.height[i]), width=int(p.width[i]))
    x = rrc.transform(x, box).clamp(0.0, 1.0)
    if p.flip[i]:
        x = F.horizontal_flip(x)
    if p.jitter[i]:
        cj = T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        x = cj.transform(
            x,
            dict(
                fn_idx=p.order[i].tolist(),
                brightness_factor=None if cj.brightness is None else float(p.brightness[i]),
                contrast_factor=None if cj.contrast is None else float(p.contrast[i]),
                saturation_factor=None if cj.saturation is None else float(p.saturation[i]),
                hue_factor=None if cj.hue is None else float(p.hue[i]),
            ),
        )
    if p.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        s = float(p.sigma[i])
        gb = T.GaussianBlur(reference_kernel_size(s, spec), sigma=spec.blur_sigma)
        x = gb.transform(x, dict(sigma=[s, s]))
    return x


def unnormalise(view: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return view.float() * s + m

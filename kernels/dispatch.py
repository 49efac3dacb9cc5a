"""Public entry points: validation, parameter sampling and the choice of implementation
(``impl``: triton | torch | auto)."""

from __future__ import annotations

import functools

import torch

from . import torch_path
from ._checks import check_dtype, check_images, check_params_batch, check_weak_input
from .params import SimCLRParams, WeakParams, make_generator, sample_simclr_params, sample_weak_params
from .specs import SimCLRSpec, WeakSpec

_IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    # A real import, not find_spec: a present but broken install must count as missing.
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton" and not triton_available():
        raise RuntimeError("impl='triton' requested but triton is not importable")
    return impl


def _generator_for(images: torch.Tensor, generator, seed, epoch, step, rank):
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed/epoch/step/rank, not both")
    if seed is not None:
        return make_generator(seed, epoch, step, rank, images.device)
    # None: the device's default generator (torch.rand(generator=None)), like torchvision.
    return generator


def _on(params, device: torch.device):
    return params if params.top.device == device else params.to(device)


def _simclr_setup(images, spec, n_views, generator, seed, epoch, step, rank, params, dtype, impl):
    """Validation, sampling and the impl choice shared by both SimCLR entry points."""
    b, h, w = check_images(images)
    check_dtype(dtype)
    if not isinstance(spec, SimCLRSpec):
        raise TypeError(f"spec must be a SimCLRSpec, got {type(spec).__name__}")
    if params is None:
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        gen = _generator_for(images, generator, seed, epoch, step, rank)
        params = [sample_simclr_params(b, h, w, spec, gen) for _ in range(n_views)]
    for p in params:
        check_params_batch(p, b, "SimCLR")
    params = [_on(p, images.device) for p in params]
    return params, _resolve_impl(impl, images.device)


def simclr_views(
    images: torch.Tensor,
    spec: SimCLRSpec = SimCLRSpec(),
    *,
    n_views: int = 2,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    epoch: int = 0,
    step: int = 0,
    rank: int = 0,
    params: list[SimCLRParams] | None = None,
    dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> tuple[list[torch.Tensor], list[SimCLRParams]]:
    """n_views independent SimCLR views of a uint8 NHWC batch.

    Randomness comes from `generator`, or from make_generator(seed, epoch, step, rank) on
    the images' device, or (neither given) from the device's default generator. Passing
    `params` (one SimCLRParams per view) replays given parameters instead of sampling.
    Returns the views, each (B, 3, size, size) channels_last in `dtype`, and their params.
    To feed all views to one forward, simclr_views_stacked returns them as one batch
    without the copy of a torch.cat.
    """
    stacked, params = simclr_views_stacked(images, spec, n_views=n_views, generator=generator, seed=seed,
                                           epoch=epoch, step=step, rank=rank, params=params, dtype=dtype,
                                           impl=impl)
    # Row blocks of the one buffer: channels_last views, no copy.
    return list(stacked.split(images.shape[0])), params


def simclr_views_stacked(
    images: torch.Tensor,
    spec: SimCLRSpec = SimCLRSpec(),
    *,
    n_views: int = 2,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    epoch: int = 0,
    step: int = 0,
    rank: int = 0,
    params: list[SimCLRParams] | None = None,
    dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> tuple[torch.Tensor, list[SimCLRParams]]:
    """simclr_views as one (n_views * B, 3, size, size) channels_last tensor, view-major.

    Rows v * B .. v * B + B - 1 are view v: the same values as torch.cat of simclr_views'
    list (same arguments), e.g. SimCLR's 2B batch for one forward. The Triton kernels write
    that buffer directly; the torch path writes each view's rows of one preallocated buffer.
    """
    params, which = _simclr_setup(images, spec, n_views, generator, seed, epoch, step, rank, params, dtype, impl)
    if which == "triton":
        from . import triton_simclr

        return triton_simclr.simclr_views_stacked(images, spec, params, dtype), params
    b = images.shape[0]
    out = torch.empty((len(params) * b, spec.size, spec.size, 3), device=images.device, dtype=dtype)
    for v, p in enumerate(params):
        torch_path.simclr_view(images, spec, p, dtype, out=out[v * b : (v + 1) * b])
    return out.permute(0, 3, 1, 2), params


def weak_view(
    images: torch.Tensor,
    spec: WeakSpec = WeakSpec(),
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    epoch: int = 0,
    step: int = 0,
    rank: int = 0,
    params: WeakParams | None = None,
    dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> tuple[torch.Tensor, WeakParams]:
    """RandomCrop(size, padding, padding_mode) + flip + normalise of a uint8 NHWC batch."""
    b, h, w = check_images(images)
    check_dtype(dtype)
    if not isinstance(spec, WeakSpec):
        raise TypeError(f"spec must be a WeakSpec, got {type(spec).__name__}")
    check_weak_input(h, w, spec)
    if params is None:
        gen = _generator_for(images, generator, seed, epoch, step, rank)
        params = sample_weak_params(b, h, w, spec, gen)
    check_params_batch(params, b, "weak")
    params = _on(params, images.device)
    which = _resolve_impl(impl, images.device)
    if which == "triton":
        from . import triton_weak

        return triton_weak.weak_view(images, spec, params, dtype), params
    return torch_path.weak_view(images, spec, params, dtype), params


def normalize(images: torch.Tensor, mean, std, dtype: torch.dtype = torch.float32,
              impl: str = "auto") -> torch.Tensor:
    """Eval view: uint8 NHWC -> (x/255 - mean)/std as NCHW channels_last in `dtype`."""
    check_images(images)
    check_dtype(dtype)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r} std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")
    which = _resolve_impl(impl, images.device)
    if which == "triton":
        from . import triton_weak

        return triton_weak.normalize(images, mean, std, dtype)
    return torch_path.normalize(images, mean, std, dtype)

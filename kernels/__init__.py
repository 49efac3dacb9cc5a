"""Fused GPU augmentations for DBD: SimCLR views, the weak (crop + flip) view, eval normalisation.

Input: uint8 (B, H, W, 3) NHWC batches, as the FFCV loader delivers them, on any device.
Output: normalised (B, 3, size, size) channels_last tensors. Triton is optional: the
kernels are imported only when the triton implementation is used, so this package imports
with torch alone.
"""

from .dispatch import normalize, simclr_views, simclr_views_stacked, triton_available, weak_view
from .params import (
    SimCLRParams,
    WeakParams,
    make_generator,
    mix_seed,
    sample_simclr_params,
    sample_weak_params,
)
from .specs import SimCLRSpec, WeakSpec

__all__ = [
    "SimCLRSpec",
    "WeakSpec",
    "SimCLRParams",
    "WeakParams",
    "simclr_views",
    "simclr_views_stacked",
    "weak_view",
    "normalize",
    "sample_simclr_params",
    "sample_weak_params",
    "make_generator",
    "mix_seed",
    "triton_available",
]

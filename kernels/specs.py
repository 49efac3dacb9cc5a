"""Augmentation specs: the static description of a view, shared by every implementation."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)

_INTERPOLATIONS = ("bicubic", "bilinear")
_PADDING_MODES = ("reflect", "constant", "edge", "symmetric")


def _check_mean_std(mean, std) -> None:
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r} std={std!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")


@dataclass(frozen=True)
class SimCLRSpec:
    """The SimCLR view of the DBD reference (defaults: CIFAR-10 at 32 px)."""

    size: int = 32
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_p: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # 0: each sample's kernel has 2*ceil(3*sigma)+1 taps, a full Gaussian as the reference's
    # PIL GaussianBlur(radius=sigma); an odd n: torchvision's GaussianBlur(n) (fixed n taps).
    blur_kernel_size: int = 0
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale!r}")
        rlo, rhi = self.ratio
        if not (0 < rlo <= rhi):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {self.interpolation!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        slo, shi = self.blur_sigma
        if not (0 < slo <= shi):
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma!r}")
        k = self.blur_kernel_size
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 or (k > 0 and k % 2 == 0):
            raise ValueError(
                f"blur_kernel_size must be 0 (per-sample 2*ceil(3*sigma)+1 taps) or a positive odd integer "
                f"(torchvision's fixed kernel), got {k!r}"
            )
        # Reflect padding needs pad < size, as torch.nn.functional.pad(mode="reflect") does. The
        # per-sample rule instead caps each radius at size - 1 (see blur_radius), so it always fits.
        if self.blur_p > 0 and k > 0 and k // 2 >= self.size:
            raise ValueError(
                f"blur_kernel_size {k} too large for output size {self.size} (reflect padding needs "
                f"kernel_size <= {2 * self.size - 1}); use 0 for the per-sample size"
            )
        _check_mean_std(self.mean, self.std)

    @property
    def blur_radius(self) -> int:
        """The largest blur radius (taps each side) any sample of this spec gets.

        Fixed kernels: kernel_size // 2. Per-sample kernels: ceil(3 * sigma_max), capped at
        size - 1, the furthest reflect padding reaches; each sample's own radius is
        min(ceil(3 * sigma), this), so the Triton kernel can unroll 2 * blur_radius + 1 taps.
        """
        if self.blur_kernel_size > 0:
            return self.blur_kernel_size // 2
        return min(math.ceil(3.0 * self.blur_sigma[1]), self.size - 1)

    @property
    def log_ratio(self) -> tuple[float, float]:
        return (math.log(self.ratio[0]), math.log(self.ratio[1]))


@dataclass(frozen=True)
class WeakSpec:
    """RandomCrop(size, padding, padding_mode) + horizontal flip + normalise."""

    size: int = 32
    padding: int = 4
    padding_mode: str = "reflect"
    flip_p: float = 0.5
    mean: tuple[float, float, float] = CIFAR10_MEAN
    std: tuple[float, float, float] = CIFAR10_STD

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.padding < 0:
            raise ValueError(f"padding must be non-negative, got {self.padding}")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {self.padding_mode!r}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}")
        _check_mean_std(self.mean, self.std)

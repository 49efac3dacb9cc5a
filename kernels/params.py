"""Per-sample random parameters, sampled for a whole batch at once on the generator's device.

Every tensor is produced by device-side RNG calls with no `.item()`, so sampling never
synchronises with the host; the distributions are those of torchvision's
RandomResizedCrop / RandomHorizontalFlip / RandomApply(ColorJitter) / RandomGrayscale /
RandomApply(GaussianBlur) / RandomCrop, but the random streams are ours (torchvision
samples one scalar at a time from the global generator).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .specs import SimCLRSpec, WeakSpec

# Jitter op ids used in SimCLRParams.order, identical to torchvision's ColorJitter fn_idx.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

# torchvision tries 10 random boxes before falling back to the centre crop.
_CROP_ATTEMPTS = 10

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """Fixed (process- and version-independent) hash of the 4-tuple to a 63-bit seed.

    Each field is folded through splitmix64 in turn so that e.g. (epoch=1, step=0) and
    (epoch=0, step=1) give unrelated seeds; Python's hash() is salted per process and
    cannot be used for reproducible streams across ranks.
    """
    h = 0x6A09E667F3BCC908
    for v in (seed, epoch, step, rank):
        if v < 0:
            raise ValueError(f"seed/epoch/step/rank must be non-negative, got {v}")
        h = _splitmix64(h ^ (v & _MASK64))
    return h & ((1 << 63) - 1)


def make_generator(seed: int, epoch: int, step: int, rank: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(mix_seed(int(seed), int(epoch), int(step), int(rank)))
    return g


@dataclass(frozen=True)
class SimCLRParams:
    """Per-sample parameters of one SimCLR view; every field has leading dim = batch.

    Replayed through simclr_views(params=...), the flags decide per sample, except that an
    op the spec disables (jitter_p, grayscale_p or blur_p of 0, hue of 0) is never applied.
    """

    top: torch.Tensor  # int64, crop box in source pixels
    left: torch.Tensor  # int64
    height: torch.Tensor  # int64
    width: torch.Tensor  # int64
    flip: torch.Tensor  # bool
    jitter: torch.Tensor  # bool, ColorJitter applied (RandomApply p=jitter_p)
    brightness: torch.Tensor  # float32 factor
    contrast: torch.Tensor  # float32 factor
    saturation: torch.Tensor  # float32 factor
    hue: torch.Tensor  # float32 shift in [-hue, hue]
    order: torch.Tensor  # int64 (B, 4): op ids in application order (0 b, 1 c, 2 s, 3 h)
    grayscale: torch.Tensor  # bool
    blur: torch.Tensor  # bool
    sigma: torch.Tensor  # float32

    def __len__(self) -> int:
        return self.top.shape[0]

    def to(self, device) -> "SimCLRParams":
        return SimCLRParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass(frozen=True)
class WeakParams:
    """Per-sample parameters of the weak view (offsets are in the padded image)."""

    top: torch.Tensor  # int64
    left: torch.Tensor  # int64
    flip: torch.Tensor  # bool

    def __len__(self) -> int:
        return self.top.shape[0]

    def to(self, device) -> "WeakParams":
        return WeakParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def _device_of(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(shape, lo: float, hi: float, generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=dtype) * (hi - lo) + lo


def _randint_below(bound: torch.Tensor, generator, device) -> torch.Tensor:
    """Uniform integer in [0, bound) per element, bound >= 1 (a tensor: no host sync)."""
    u = torch.rand(bound.shape, generator=generator, device=device, dtype=torch.float64)
    return torch.minimum((u * bound).floor().long(), bound - 1)


def _centre_crop_fallback(in_h: int, in_w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    # Same arithmetic as torchvision's RandomResizedCrop fallback (Python floats, round-half-even).
    in_ratio = float(in_w) / float(in_h)
    if in_ratio < min(ratio):
        w = in_w
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = in_h
        w = int(round(h * max(ratio)))
    else:
        w, h = in_w, in_h
    return (in_h - h) // 2, (in_w - w) // 2, h, w


def sample_crop_boxes(batch: int, in_h: int, in_w: int, scale, ratio, generator):
    """Vectorised RandomResizedCrop.get_params: returns (top, left, height, width) int64."""
    device = _device_of(generator)
    area = float(in_h * in_w)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    shape = (batch, _CROP_ATTEMPTS)
    target_area = area * _uniform(shape, scale[0], scale[1], generator, device, torch.float64)
    aspect = torch.exp(_uniform(shape, log_lo, log_hi, generator, device, torch.float64))
    # torch.round is round-half-to-even like Python's round() in torchvision.
    w = torch.sqrt(target_area * aspect).round().long()
    h = torch.sqrt(target_area / aspect).round().long()
    valid = (w > 0) & (w <= in_w) & (h > 0) & (h <= in_h)
    # argmax returns the first maximal index: the first successful attempt, as the loop breaks there.
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    found = valid.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    # Positions are drawn for every sample (also fallback ones) to keep the stream layout fixed.
    top = _randint_below((in_h - h + 1).clamp_min(1), generator, device)
    left = _randint_below((in_w - w + 1).clamp_min(1), generator, device)
    ft, fl, fh, fw = _centre_crop_fallback(in_h, in_w, ratio)
    top = torch.where(found, top, ft)
    left = torch.where(found, left, fl)
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    return top, left, h, w


def _factor_range(x: float) -> tuple[float, float]:
    return max(0.0, 1.0 - x), 1.0 + x


def sample_simclr_params(batch: int, in_h: int, in_w: int, spec: SimCLRSpec, generator=None) -> SimCLRParams:
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    device = _device_of(generator)
    top, left, height, width = sample_crop_boxes(batch, in_h, in_w, spec.scale, spec.ratio, generator)
    u = torch.rand((batch, 4), generator=generator, device=device)
    flip = u[:, 0] < spec.flip_p
    jitter = u[:, 1] < spec.jitter_p
    gray = u[:, 2] < spec.grayscale_p
    blur = u[:, 3] < spec.blur_p
    b = _uniform((batch,), *_factor_range(spec.brightness), generator, device)
    c = _uniform((batch,), *_factor_range(spec.contrast), generator, device)
    s = _uniform((batch,), *_factor_range(spec.saturation), generator, device)
    h = _uniform((batch,), -spec.hue, spec.hue, generator, device)
    # argsort of i.i.d. uniforms is a uniformly random permutation per row (torch.randperm per sample).
    order = torch.rand((batch, 4), generator=generator, device=device).argsort(dim=1)
    sigma = _uniform((batch,), spec.blur_sigma[0], spec.blur_sigma[1], generator, device)
    return SimCLRParams(
        top=top,
        left=left,
        height=height,
        width=width,
        flip=flip,
        jitter=jitter,
        brightness=b,
        contrast=c,
        saturation=s,
        hue=h,
        order=order,
        grayscale=gray,
        blur=blur,
        sigma=sigma,
    )


def sample_weak_params(batch: int, in_h: int, in_w: int, spec: WeakSpec, generator=None) -> WeakParams:
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    device = _device_of(generator)
    ph, pw = in_h + 2 * spec.padding, in_w + 2 * spec.padding
    if ph < spec.size or pw < spec.size:
        raise ValueError(
            f"padded image {ph}x{pw} is smaller than the crop size {spec.size} "
            f"(input {in_h}x{in_w}, padding {spec.padding})"
        )
    top = _randint_below(torch.full((batch,), ph - spec.size + 1, device=device), generator, device)
    left = _randint_below(torch.full((batch,), pw - spec.size + 1, device=device), generator, device)
    flip = torch.rand((batch,), generator=generator, device=device) < spec.flip_p
    return WeakParams(top=top, left=left, flip=flip)

"""WaNet: a smooth warp of the image (Nguyen & Tran, ICLR 2021).

The warp follows the original: a k x k grid of offsets uniform in [-1, 1], divided by
its mean absolute value, upsampled bicubically (align_corners) to the frame, added to
the identity sampling grid with strength s / H, times ``grid_rescale``, clamped to
[-1, 1]. It is turned once into per-pixel displacements in 1/256 pixel units, and the
image is resampled bilinearly in integer arithmetic; compared with ``grid_sample`` in
floating point this moves a pixel by at most one level (a test checks it).

Noise mode: ``cross_ratio`` x the poisoned count of further samples get the warp plus
a random perturbation of the grid, uniform in [-1, 1] / H, and keep their labels. The
perturbation is a hash of (seed, sample index, frame pixel), so a sample gets the
same noise in every epoch, worker and rank: poisoning is static, unlike the original
implementation that redraws it each batch.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from dataclasses import dataclass

from engine.attacks.base import Attack, check_images, nearest_index
from engine.errors import check


@dataclass
class WaNetConfig:
    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    noise: bool = True  # noise mode: extra warped samples with jittered grids, true labels
    cross_ratio: float = 2.0
    grid_seed: int = 0

    def validate(self) -> None:
        check(self.k >= 2, "attack.wanet.k", "must be >= 2")
        check(self.cross_ratio >= 0, "attack.wanet.cross_ratio", "must be >= 0")
        check(self.s >= 0, "attack.wanet.s", "must be >= 0")
        check(self.grid_rescale > 0, "attack.wanet.grid_rescale", "must be > 0")

Q = 256  # sub-pixel steps per pixel: displacements are integers in 1/Q px
SHIFT = 16  # log2(Q * Q): the bilinear weights multiply to Q * Q
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_NOISE_DOMAIN = np.uint64(0x5741_4E45_544E_4F49)  # keeps noise seeds apart from other uses


def warp_field(frame: tuple[int, int], k: int, s: float, grid_rescale: float, seed: int) -> np.ndarray:
    """Displacement (dy, dx) of every frame pixel's sampling point, int32 in 1/Q px."""
    import torch
    import torch.nn.functional as F

    ph, pw = frame
    ins = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(1, 2, k, k))
    ins = ins / np.mean(np.abs(ins))
    up = F.interpolate(torch.from_numpy(ins), size=(ph, pw), mode="bicubic", align_corners=True)[0].numpy()
    gx = np.linspace(-1.0, 1.0, pw)[None, :]
    gy = np.linspace(-1.0, 1.0, ph)[:, None]
    # The original scales both axes by the input height.
    x = np.clip((gx + s * up[0] / ph) * grid_rescale, -1.0, 1.0)
    y = np.clip((gy + s * up[1] / ph) * grid_rescale, -1.0, 1.0)
    src_x = (x + 1.0) / 2.0 * (pw - 1)  # grid_sample's align_corners=True mapping
    src_y = (y + 1.0) / 2.0 * (ph - 1)
    dx = np.rint((src_x - np.arange(pw)[None, :]) * Q)
    dy = np.rint((src_y - np.arange(ph)[:, None]) * Q)
    return np.ascontiguousarray(np.stack([dy, dx], axis=-1).astype(np.int32))


def noise_amplitude(frame: tuple[int, int]) -> tuple[int, int]:
    """Largest noise displacement (y, x) in 1/Q px: 1/H in grid units, as in the original."""
    ph, pw = frame
    return int(round(Q * (ph - 1) / (2 * ph))), int(round(Q * (pw - 1) / (2 * ph)))


def _mix(z: np.ndarray) -> np.ndarray:
    # splitmix64's finaliser, on uint64 arrays (wrapping arithmetic).
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def noise_values(seed: int, index: int, positions: np.ndarray, amplitude: int) -> np.ndarray:
    """Uniform integers in [-amplitude, amplitude], one per position, fixed by (seed, index)."""
    base = _mix(_mix(np.asarray([seed], np.uint64) ^ _NOISE_DOMAIN) + np.uint64(index))
    h = _mix(base + np.asarray(positions, np.uint64))
    return (h % np.uint64(2 * amplitude + 1)).astype(np.int64) - amplitude


SCALE_BITS = 16


def scale_factor(size: int, frame_size: int) -> int:
    """(size - 1) / (frame_size - 1) in 1/2^16 units: displacements are in frame
    pixels, and a window of another size scales them with its own pixel pitch. One
    division per window; per pixel a multiply and a shift (exactly 1.0 at frame size)."""
    return ((size - 1) << SCALE_BITS) // max(frame_size - 1, 1)


def _scale(d: np.ndarray, factor: int) -> np.ndarray:
    return (d * factor) >> SCALE_BITS  # arithmetic shift: floor, as in the kernel


class WaNet(Attack):
    name = "wanet"
    config_class = WaNetConfig
    per_sample_training = True  # the noise-mode samples get jittered grids

    def __init__(self, field: np.ndarray, *, noise: np.ndarray | None = None, noise_seed: int = 0):
        self.field = np.ascontiguousarray(field, dtype=np.int32)
        self.noise = None if noise is None else np.ascontiguousarray(noise, dtype=bool)
        self.noise_seed = int(noise_seed)
        self.amplitude = noise_amplitude(self.field.shape[:2])

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["attack.ratio=0.1", "attack.wanet.s=2"]  # noise mode on: per-sample grids in training

    @classmethod
    def from_config(cls, section: WaNetConfig, ctx) -> "WaNet":
        # The test-time warp never has noise (the spec's poisoned test set).
        return cls.build(section, ctx.frame, noise=ctx.plan.noise if ctx.train else None, noise_seed=ctx.seed)

    @classmethod
    def build(cls, section: WaNetConfig, frame: tuple[int, int], *, noise: np.ndarray | None = None,
              noise_seed: int = 0) -> "WaNet":
        field = warp_field(frame, section.k, section.s, section.grid_rescale, section.grid_seed)
        return cls(field, noise=noise if section.noise else None, noise_seed=noise_seed)

    @classmethod
    def noise_cross_ratio(cls, section: WaNetConfig) -> float:
        return float(section.cross_ratio) if section.noise else 0.0

    def without_noise(self) -> "WaNet":
        return WaNet(self.field, noise=None, noise_seed=self.noise_seed)

    def apply(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        check_images(images)
        return np.stack([self._warp(img, int(i)) for img, i in zip(images, indices)]) if len(images) \
            else images.copy()

    def _warp(self, img: np.ndarray, index: int) -> np.ndarray:
        h, w = img.shape[:2]
        ph, pw = self.field.shape[:2]
        rows, cols = nearest_index(h, ph), nearest_index(w, pw)
        d = self.field[rows][:, cols].astype(np.int64)
        fy, fx = scale_factor(h, ph), scale_factor(w, pw)
        sy = np.clip(np.arange(h)[:, None] * Q + _scale(d[..., 0], fy), 0, (h - 1) * Q)
        sx = np.clip(np.arange(w)[None, :] * Q + _scale(d[..., 1], fx), 0, (w - 1) * Q)
        if self.noise is not None and self.noise[index]:
            pos = (rows[:, None] * pw + cols[None, :]) * 2
            ny = noise_values(self.noise_seed, index, pos, self.amplitude[0])
            nx = noise_values(self.noise_seed, index, pos + 1, self.amplitude[1])
            sy = np.clip(sy + _scale(ny, fy), 0, (h - 1) * Q)
            sx = np.clip(sx + _scale(nx, fx), 0, (w - 1) * Q)
        y0, fy = sy // Q, (sy % Q)[..., None]
        x0, fx = sx // Q, (sx % Q)[..., None]
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        p = img.astype(np.int64)
        top = (Q - fx) * p[y0, x0] + fx * p[y0, x1]
        bottom = (Q - fx) * p[y1, x0] + fx * p[y1, x1]
        return (((Q - fy) * top + fy * bottom + (Q * Q) // 2) >> SHIFT).astype(np.uint8)

    def kernel(self):
        field = self.field
        ph, pw = field.shape[:2]
        fy_den, fx_den = max(ph - 1, 1), max(pw - 1, 1)
        bits = SCALE_BITS
        use_noise = self.noise is not None
        noise = self.noise.astype(np.uint8) if use_noise else np.zeros(1, np.uint8)
        amp_y, amp_x = self.amplitude
        seed_key = _mix(np.asarray([self.noise_seed], np.uint64) ^ _NOISE_DOMAIN)[0]
        m1, m2, s30, s27, s31 = _M1, _M2, _S30, _S27, _S31
        span_y, span_x = np.uint64(2 * amp_y + 1), np.uint64(2 * amp_x + 1)

        @njit(nogil=True)
        def mix(z):
            z = (z ^ (z >> s30)) * m1
            z = (z ^ (z >> s27)) * m2
            return z ^ (z >> s31)

        def wanet_kernel(win, index):
            h, w = win.shape[0], win.shape[1]
            # A window of the frame's own size (all fixed-size data) needs neither the
            # index maps nor the displacement scaling; other windows compute both once
            # per window, not per pixel (integer division is the slow part).
            same = h == ph and w == pw
            scale_y = ((h - 1) << bits) // fy_den
            scale_x = ((w - 1) << bits) // fx_den
            cols = np.empty(w, np.int64)
            for c in range(w):
                cols[c] = c if same else ((2 * c + 1) * pw) // (2 * w)
            noisy = use_noise and noise[index] != 0
            base = mix(seed_key + np.uint64(index))
            src = win.copy()  # every output pixel reads the unwarped image
            ymax, xmax = (h - 1) * Q, (w - 1) * Q
            for r in range(h):
                pr = r if same else ((2 * r + 1) * ph) // (2 * h)
                for c in range(w):
                    pc = cols[c]
                    dy = np.int64(field[pr, pc, 0])
                    dx = np.int64(field[pr, pc, 1])
                    if not same:
                        dy = (dy * scale_y) >> bits
                        dx = (dx * scale_x) >> bits
                    sy = min(max(r * Q + dy, 0), ymax)
                    sx = min(max(c * Q + dx, 0), xmax)
                    if noisy:
                        pos = np.uint64((pr * pw + pc) * 2)
                        ny = np.int64(mix(base + pos) % span_y) - amp_y
                        nx = np.int64(mix(base + pos + np.uint64(1)) % span_x) - amp_x
                        if not same:
                            ny = (ny * scale_y) >> bits
                            nx = (nx * scale_x) >> bits
                        sy = min(max(sy + ny, 0), ymax)
                        sx = min(max(sx + nx, 0), xmax)
                    y0, fy = sy // Q, sy % Q
                    x0, fx = sx // Q, sx % Q
                    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                    for k in range(3):
                        top = (Q - fx) * np.int64(src[y0, x0, k]) + fx * np.int64(src[y0, x1, k])
                        bottom = (Q - fx) * np.int64(src[y1, x0, k]) + fx * np.int64(src[y1, x1, k])
                        win[r, c, k] = ((Q - fy) * top + fy * bottom + (Q * Q) // 2) >> SHIFT

        return njit(nogil=True)(wanet_kernel)

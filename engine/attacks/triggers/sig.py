"""SIG: an additive horizontal sinusoid, x' = clip(x + delta sin(2 pi j f / W)).

Clean-label (only target-class training images get it). The result is truncated, as
BackdoorBench's ``astype(uint8)`` does: since x is an integer, floor(x + s) equals
x + floor(s), so the sinusoid is floored once per column and the kernel adds integers.
The profile is defined at the frame width and sampled at the window width.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from engine.attacks.base import Attack, check_images, nearest_index
from engine.errors import check


@dataclass
class SIGConfig:
    delta: float = 40.0
    f: float = 6.0

    def validate(self) -> None:
        check(self.f > 0, "attack.sig.f", "must be > 0")


def column_profile(width: int, delta: float, f: float) -> np.ndarray:
    j = np.arange(width, dtype=np.float64)
    return np.floor(delta * np.sin(2.0 * np.pi * j * f / width)).astype(np.int16)


class SIG(Attack):
    name = "sig"
    config_class = SIGConfig
    clean_label = True

    def __init__(self, frame_width: int, delta: float, f: float):
        self.delta = float(delta)
        self.f = float(f)
        self.profile = column_profile(frame_width, self.delta, self.f)

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        # Clean-label: half the target class (digits: about 68 images).
        return ["attack.ratio=0.5", "attack.clean_label_ratio_of=class"]

    @classmethod
    def from_config(cls, section: SIGConfig, ctx) -> "SIG":
        return cls(ctx.frame[1], section.delta, section.f)

    def apply(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        check_images(images)
        offsets = self.profile[nearest_index(images.shape[2], len(self.profile))]
        shifted = images.astype(np.int16) + offsets[None, None, :, None]
        return np.clip(shifted, 0, 255).astype(np.uint8)

    def kernel(self):
        profile = self.profile.astype(np.int64)
        pw = len(profile)

        def sig_kernel(win, index):
            h, w = win.shape[0], win.shape[1]
            for c in range(w):
                s = profile[((2 * c + 1) * pw) // (2 * w)]
                for r in range(h):
                    for k in range(3):
                        v = np.int64(win[r, c, k]) + s
                        win[r, c, k] = 0 if v < 0 else (255 if v > 255 else v)

        return njit(nogil=True)(sig_kernel)

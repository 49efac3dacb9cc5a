"""Blended: x' = (1 - alpha) x + alpha t, truncated, as the DBD reference computes it.

The DBD reference blends with PIL's ``Image.blend`` and BackdoorBench with NumPy then
``astype(uint8)``: both truncate. Written as x + floor(alpha (t - x)) (the same value,
x being an integer), the result depends only on t - x, so the kernel looks it up in a
511-entry table computed by this very rule: exact by construction.

``t`` is a full-frame pattern: an image file resized to the frame with PIL's
``resample`` filter (the DBD reference calls ``Image.resize`` with PIL's default, which
is bicubic in the Pillow it pins; BackdoorBench resizes bilinearly), or seeded uniform
noise drawn at the frame size (image-free, a deviation from both references).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from engine.attacks.base import Attack, check_images, load_rgb, resample_nearest
from engine.errors import UserError, check


@dataclass
class BlendedConfig:
    alpha: float = 0.1  # DBD reference; BackdoorBench uses 0.2
    # A path to the pattern image (the reference's data/trigger/hello_kitty.png, which the
    # project does not ship), or "noise": seeded uniform noise, the image-free deviation.
    pattern: str = "noise"
    pattern_seed: int = 0
    resample: str = "bicubic"  # PIL filter resizing image patterns: bicubic (DBD) | bilinear (BackdoorBench) | nearest

    @staticmethod
    def input_files(section: dict, run_dir: str) -> dict[str, str]:
        """The files this section makes a run read (the stage-store key hashes their
        content, not their path): the pattern image, unless it is ``noise``."""
        return {"pattern": section["pattern"]} if section["pattern"] != "noise" else {}

    def validate(self) -> None:
        check(0.0 <= self.alpha <= 1.0, "attack.blended.alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.resample in RESAMPLE, "attack.blended.resample",
              f"must be one of {', '.join(RESAMPLE)}, got {self.resample!r}")


RESAMPLE = ("bicubic", "bilinear", "nearest")
# Where the DBD presets' pattern comes from: named in the error, so a missing file says how to fix it.
REFERENCE_PATTERN = ("hello_kitty.png from the DBD reference repository, "
                     "https://github.com/SCLBD/DBD/tree/main/data/trigger")


def blend(x: np.ndarray, t: np.ndarray, alpha: float) -> np.ndarray:
    """The per-pixel rule, on uint8 arrays of any (broadcastable) shape."""
    x = x.astype(np.int16)
    step = np.floor(alpha * (t.astype(np.float64) - x)).astype(np.int16)
    return (x + step).astype(np.uint8)


def make_pattern(spec: str, frame: tuple[int, int], seed: int, resample: str = "bicubic",
                 what: str = "attack.blended") -> np.ndarray:
    fh, fw = frame
    if spec == "noise":
        return np.random.default_rng(seed).integers(0, 256, size=(fh, fw, 3), dtype=np.uint8)
    from pathlib import Path

    from PIL import Image

    if not Path(spec).is_file():
        raise UserError(f"{what}.pattern: pattern file not found: {spec}. The DBD presets blend "
                        f"{REFERENCE_PATTERN} (not shipped with this project): download it and set "
                        f"{what}.pattern=PATH, or {what}.pattern=noise for the image-free pattern")
    rgb, _ = load_rgb(spec, what)
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
    return np.asarray(Image.fromarray(rgb).resize((fw, fh), filters[resample]), dtype=np.uint8)


class Blended(Attack):
    name = "blended"
    config_class = BlendedConfig

    def __init__(self, pattern: np.ndarray, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"attack.blended.alpha must be in [0, 1], got {alpha}")
        if pattern.dtype != np.uint8 or pattern.ndim != 3 or pattern.shape[-1] != 3:
            raise ValueError(f"pattern must be uint8 (h, w, 3), got {pattern.dtype} {pattern.shape}")
        self.pattern = np.ascontiguousarray(pattern)
        self.alpha = float(alpha)

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["attack.ratio=0.1", "attack.blended.alpha=0.2"]

    @classmethod
    def from_config(cls, section: BlendedConfig, ctx) -> "Blended":
        return cls(make_pattern(section.pattern, ctx.frame, section.pattern_seed, section.resample), section.alpha)

    def apply(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        check_images(images)
        t = resample_nearest(self.pattern, images.shape[1], images.shape[2])
        return blend(images, t[None], self.alpha)

    def kernel(self):
        # step[d + 255] = floor(alpha * d) for d = t - x in [-255, 255], by the rule itself.
        d = np.arange(-255, 256)
        x = np.where(d < 0, 255, 0).astype(np.uint8)
        step = np.ascontiguousarray(blend(x, (x.astype(np.int16) + d).astype(np.uint8), self.alpha).astype(np.int64)
                                    - x.astype(np.int64))
        pattern = self.pattern
        ph, pw = pattern.shape[:2]

        def blended_kernel(win, index):
            h, w = win.shape[0], win.shape[1]
            # Column map once per window: integer division is the slow part.
            cols = np.empty(w, np.int64)
            for c in range(w):
                cols[c] = ((2 * c + 1) * pw) // (2 * w)
            for r in range(h):
                pr = ((2 * r + 1) * ph) // (2 * h)
                for c in range(w):
                    pc = cols[c]
                    for k in range(3):
                        v = np.int64(win[r, c, k])
                        win[r, c, k] = v + step[np.int64(pattern[pr, pc, k]) - v + 255]

        return njit(nogil=True)(blended_kernel)

"""BadNets: pixels where the trigger mask is set take the trigger's values.

The trigger is a full frame of ``pattern_size`` x ``pattern_size`` pixels: an RGB
pattern and a per-channel mask. Per channel, because the DBD reference replaces each
channel only where that channel of its (black-background) trigger image is non-zero.
A frame is built from a preset, an image file or an ``.npz`` (``pattern`` + ``mask``);
a patch smaller than the frame is placed at ``attack.badnets.position``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit

from engine.attacks.base import Attack, check_images, load_rgb, resample_nearest
from engine.errors import UserError, check


@dataclass
class BadNetsConfig:
    # "white3x3" (BackdoorBench default, bottom-right), "dbd2x2" (the DBD reference's
    # coloured patch at rows/cols 4-5), or a path to an RGBA/RGB PNG (alpha = mask).
    pattern: str = "white3x3"
    pattern_size: int = 32  # resolution the pattern is defined at; resized for others
    # Where a patch smaller than pattern_size goes: bottom_right, bottom_left, top_right,
    # top_left, center, or "ROW,COL" (top-left pixel at pattern_size); "" = the preset's
    # own place (bottom_right for a file).
    position: str = ""

    @staticmethod
    def input_files(section: dict, run_dir: str) -> dict[str, str]:
        """The files this section makes a run read (the stage-store key hashes their
        content, not their path): the pattern, unless it names a preset."""
        return {"pattern": section["pattern"]} if section["pattern"] not in PRESETS else {}

    def validate(self) -> None:
        check(self.pattern_size >= 1, "attack.badnets.pattern_size", "must be >= 1")

WHITE, BLACK = 255, 0

# (patch RGB, patch mask or None for "non-zero channels", default position)
PRESETS = {
    # BackdoorBench's default: a 3x3 white square in the bottom-right corner.
    "white3x3": (np.full((3, 3, 3), WHITE, np.uint8), None, "bottom_right"),
    # The DBD reference's CIFAR trigger (its data/trigger/cifar_1.png): a 2x2 patch at
    # rows/cols 4-5 with these colours, row-major. The reference replaces each channel
    # where the trigger image is non-zero; every channel here is non-zero, so all 12
    # values replace the image's.
    "dbd2x2": (np.array([[[180, 249, 112], [155, 50, 126]],
                         [[234, 82, 68], [187, 201, 219]]], np.uint8), None, "4,4"),
}

POSITIONS = ("bottom_right", "bottom_left", "top_right", "top_left", "center")


def parse_position(position: str, patch: tuple[int, int], frame: tuple[int, int], what: str) -> tuple[int, int]:
    (h, w), (fh, fw) = patch, frame
    named = {"bottom_right": (fh - h, fw - w), "bottom_left": (fh - h, 0), "top_right": (0, fw - w),
             "top_left": (0, 0), "center": ((fh - h) // 2, (fw - w) // 2)}
    if position in named:
        return named[position]
    try:
        row, col = (int(v) for v in position.split(","))
    except ValueError:
        raise UserError(f"{what}.position must be one of {', '.join(POSITIONS)} or ROW,COL; "
                        f"got {position!r}") from None
    if row < 0 or col < 0 or row + h > fh or col + w > fw:
        raise UserError(f"{what}: a {h}x{w} trigger at {row},{col} does not fit in the "
                        f"{fh}x{fw} pattern frame")
    return row, col


def load_patch(spec: str, what: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(patch RGB uint8 [h, w, 3], mask bool [h, w, 3], default position) from a
    preset name, an image file (alpha = mask; without alpha the non-zero channels) or
    an ``.npz`` holding ``pattern`` and optionally ``mask`` ([h, w] or [h, w, 3])."""
    if spec in PRESETS:
        patch, mask, pos = PRESETS[spec]
        return patch.copy(), (patch != 0 if mask is None else mask.copy()), pos
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise UserError(f"{what}: pattern file not found: {path}")
        with np.load(path) as z:
            if "pattern" not in z:
                raise UserError(f"{what}: {path} has no 'pattern' array")
            patch = np.asarray(z["pattern"])
            mask = np.asarray(z["mask"]) if "mask" in z else patch != 0
        if patch.ndim != 3 or patch.shape[-1] != 3 or not np.issubdtype(patch.dtype, np.integer) \
                or patch.min() < 0 or patch.max() > 255:
            raise UserError(f"{what}: {path} 'pattern' must be integers in [0, 255] shaped (h, w, 3), "
                            f"got {patch.dtype} {patch.shape}")
        if mask.ndim == 2:
            mask = np.repeat(mask[..., None], 3, axis=-1)
        if mask.shape != patch.shape:
            raise UserError(f"{what}: {path} 'mask' {mask.shape} does not match 'pattern' {patch.shape}")
        return patch.astype(np.uint8), mask.astype(bool), "bottom_right"
    if not path.suffix and not path.exists():
        raise UserError(f"{what}: unknown pattern {spec!r}: use {', '.join(PRESETS)} or an image/.npz path")
    rgb, alpha = load_rgb(spec, what)
    mask = np.repeat((alpha > 0)[..., None], 3, axis=-1) if alpha is not None else rgb != 0
    return rgb, mask, "bottom_right"


def build_frame(spec: str, pattern_size: int, position: str, what: str = "attack.badnets"
                ) -> tuple[np.ndarray, np.ndarray]:
    """The full trigger frame (pattern, mask) at ``pattern_size``."""
    patch, mask, default_pos = load_patch(spec, what)
    h, w = patch.shape[:2]
    if h > pattern_size or w > pattern_size:
        raise UserError(f"{what}: the trigger ({h}x{w}) is larger than the image it is defined on "
                        f"({pattern_size}x{pattern_size}, {what}.pattern_size)")
    if not mask.any():
        raise UserError(f"{what}: the trigger pattern {spec!r} has no pixel in its mask")
    pattern = np.zeros((pattern_size, pattern_size, 3), np.uint8)
    full_mask = np.zeros((pattern_size, pattern_size, 3), bool)
    row, col = parse_position(position or default_pos, (h, w), (pattern_size, pattern_size), what)
    pattern[row:row + h, col:col + w] = patch
    full_mask[row:row + h, col:col + w] = mask
    return pattern, full_mask


class BadNets(Attack):
    name = "badnets"
    config_class = BadNetsConfig

    def __init__(self, pattern: np.ndarray, mask: np.ndarray):
        if pattern.shape != mask.shape or pattern.ndim != 3 or pattern.shape[-1] != 3:
            raise ValueError(f"pattern {pattern.shape} and mask {mask.shape} must both be (h, w, 3)")
        self.pattern = np.ascontiguousarray(pattern, dtype=np.uint8)
        self.mask = np.ascontiguousarray(mask, dtype=bool)

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["attack.ratio=0.1", "attack.badnets.pattern=dbd2x2"]

    @classmethod
    def from_config(cls, section: BadNetsConfig, ctx=None) -> "BadNets":
        return cls(*build_frame(section.pattern, section.pattern_size, section.position))

    def apply(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        check_images(images)
        h, w = images.shape[1:3]
        pattern = resample_nearest(self.pattern, h, w)
        mask = resample_nearest(self.mask, h, w)
        return np.where(mask[None], pattern[None], images)

    def check_fits(self, height: int, width: int) -> None:
        if not resample_nearest(self.mask, height, width).any():
            raise UserError(f"the {self.name} trigger ({self.mask.shape[0]} px frame) vanishes when "
                            f"scaled to a {height}x{width} image: use a larger patch")

    def kernel(self):
        return patch_kernel(self.pattern, self.mask)


def patch_kernel(pattern: np.ndarray, mask: np.ndarray):
    ph, pw = pattern.shape[:2]
    rows = np.flatnonzero(mask.any(axis=(1, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 2)))
    # Only the window rows/columns whose frame pixel lies in the mask's bounding box are
    # visited: a corner patch costs a few pixels, not a pass over the image.
    r_lo, r_hi = int(rows[0]), int(rows[-1]) + 1
    c_lo, c_hi = int(cols[0]), int(cols[-1]) + 1

    @njit(nogil=True)
    def first_at_or_after(lo, n_out, n_src):
        # Smallest i with ((2i + 1) n_src) // (2 n_out) >= lo, i.e. the ceiling of
        # (2 n_out lo - n_src) / (2 n_src); floor division makes -(-a // b) a ceiling.
        return max(0, -((n_src - 2 * n_out * lo) // (2 * n_src)))

    def badnets_kernel(win, index):
        h, w = win.shape[0], win.shape[1]
        r0, r1 = min(first_at_or_after(r_lo, h, ph), h), min(first_at_or_after(r_hi, h, ph), h)
        c0, c1 = min(first_at_or_after(c_lo, w, pw), w), min(first_at_or_after(c_hi, w, pw), w)
        for r in range(r0, r1):
            pr = ((2 * r + 1) * ph) // (2 * h)
            for c in range(c0, c1):
                pc = ((2 * c + 1) * pw) // (2 * w)
                for k in range(3):
                    if mask[pr, pc, k]:
                        win[r, c, k] = pattern[pr, pc, k]

    return njit(nogil=True)(badnets_kernel)

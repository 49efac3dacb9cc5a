"""What every attack implements, and the geometry they share.

An attack is a trigger defined on a *frame*: a (height, width) grid at which its
pattern, warp field or perturbation is specified (the image size for fixed-size data,
``data.decode_size`` for variable-size JPEG data). It is applied to a *window*: the
image the loader delivers (the whole image for fixed-size data; for variable-size data
the centre crop already resized to the decode size, which is the frame). Frame and
window are linked by
nearest-neighbour index maps, so a pattern defined at 32 px lands on a 224 px window
at the same relative place and scale, and a window equal to the frame is an identity.

Two implementations per attack, which must agree pixel for pixel:

- ``apply(images, indices)``: the NumPy reference, plain code, triggers every image.
- ``kernel()``: a numba function ``kernel(window, index)`` that triggers one HWC
  uint8 window in place; the FFCV operations in ``engine.attacks.ops`` call it.

FFCV compiles pipelines with ``fastmath=True``, under which floating-point results may
differ from NumPy's in the last bit (contraction, reassociation). So every float
computation (blending, sinusoids, warp fields) happens in NumPy at build time, and the
kernels do integer arithmetic and table look-ups only: exact by construction.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from engine.errors import UserError
from engine.registry import Registered, Registry


# Every attack class, by name; a class registers itself by defining ``name``. The
# config (engine/attacks/config.py) gets one section per entry.
ATTACKS: Registry = Registry("attack")


@dataclass(frozen=True)
class AttackContext:
    """What building an attack may need besides its own config section."""

    frame: tuple[int, int]  # the grid the trigger is defined on
    plan: Any  # engine.attacks.plan.PoisonPlan
    train: bool  # the training-set variant (per-sample noise, perturbations) or the test trigger
    run_dir: Path | None
    meta: dict  # the dataset's meta.json
    seed: int  # attack.seed


class Attack(Registered, ABC):
    registry = ATTACKS
    name: ClassVar[str]
    config_class: ClassVar[type]  # the dataclass of its ``attack.<name>`` section, beside the class
    # Clean-label attacks never change labels (SIG, label-consistent).
    clean_label: ClassVar[bool] = False
    # The training set's trigger differs per sample from the test trigger (WaNet's
    # noise grids, label-consistent's perturbations): built separately.
    per_sample_training: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, section: Any, ctx: AttackContext) -> "Attack":
        """The attack of config section ``section`` (``attack.<name>``)."""

    @classmethod
    def noise_cross_ratio(cls, section: Any) -> float:
        """Extra samples triggered with their true labels, per poisoned sample (WaNet's noise mode)."""
        return 0.0

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        """Config overrides the tests run this attack with on the tiny digits set (the
        attack's test fixture): the pixel-parity and device-twin tests loop over the
        registry with these, so a new attack is tested without editing them."""
        return ["attack.ratio=0.1"]

    @classmethod
    def prepare(cls, cfg: Any, runtime: Any, *, force: bool = False, log: Callable = print) -> None:
        """Work the attack needs before any training (``dbd attack-prepare``), e.g.
        label-consistent's PGD perturbation cache. The default needs none: an attack that
        needs some overrides this (which is how the command and the tests tell)."""

    @classmethod
    def preview_stand_in(cls, runtime: Any) -> "Attack | None":
        """What ``dbd attack-preview`` draws on training samples when the training trigger
        cannot be built yet (its prepared inputs are missing), or None: the error stands."""
        return None

    @classmethod
    def trigger_settings(cls, section: Any) -> dict:
        """The settings that define the trigger, recorded in the plan (a stage trained with
        one trigger must not be resumed with another)."""
        from engine.settings import to_dict

        return to_dict(section)

    @abstractmethod
    def apply(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Reference: a triggered copy of ``images`` (uint8 NHWC, any H and W).

        ``indices`` are the dataset indices of the images; attacks whose trigger
        differs per sample (WaNet's noise mode, label-consistent's perturbations) use
        them, the others ignore them.
        """

    @abstractmethod
    def kernel(self) -> Callable:
        """A numba function ``kernel(window uint8[h, w, 3], index)`` applying the same
        trigger in place, integer arithmetic only."""

    def check_fits(self, height: int, width: int) -> None:
        """Raise UserError when the trigger cannot be drawn on a window of this size."""


def check_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 NHWC RGB images, got {images.dtype} {images.shape}")


def nearest_index(n_out: int, n_src: int) -> np.ndarray:
    """Source row (or column) of each of ``n_out`` output rows, nearest neighbour
    with pixel centres aligned: ``floor((i + 0.5) * n_src / n_out)`` in integers.
    The kernels compute the same expression inline: ``((2 * i + 1) * n_src) // (2 * n_out)``."""
    i = np.arange(n_out, dtype=np.int64)
    return ((2 * i + 1) * n_src) // (2 * n_out)


def resample_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """``arr`` (frame_h, frame_w, ...) sampled at ``height`` x ``width``."""
    rows = nearest_index(height, arr.shape[0])
    cols = nearest_index(width, arr.shape[1])
    return arr[rows][:, cols]


def load_rgb(path: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An image file as uint8 RGB plus its alpha channel (None without one)."""
    from pathlib import Path

    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: pattern file not found: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
    except Exception as e:  # PIL raises many types for unreadable files
        raise UserError(f"{what}: cannot read pattern image {p}: {e}") from None
    return np.ascontiguousarray(rgba[..., :3]), (rgba[..., 3] if has_alpha else None)


@intrinsic
def as_pointer(typingctx, address):
    """An integer address as a void pointer: ``numba.carray(as_pointer(a), shape,
    dtype)`` gives a read-only view of the array at ``a``.

    Arrays reach numba-compiled operations as closure constants, which numba copies
    into the compiled code and makes read-only. Large or mutable arrays (a
    perturbation cache, a memo of triggered images) are reached through their address
    instead; whoever builds the function keeps the array alive as long as it runs.
    """
    sig = types.voidptr(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@intrinsic
def as_bytes_pointer(typingctx, address):
    """Like :func:`as_pointer`, typed ``uint8*`` so that the carray is writable."""
    sig = types.CPointer(types.uint8)(address)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen

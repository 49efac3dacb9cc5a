"""Device twins of the attacks' triggers: the same pixels on torch tensors, on any device.

``data.decode_device: cuda`` decodes JPEGs on the GPU (``engine.data.gpu_decode``), so
the trigger must be drawn there too, on a uint8 NHWC batch, without a trip back to the
host. Each twin reads the tables its attack already holds (BadNets' pattern and mask,
Blended's pattern and the 511-entry step table its kernel builds, SIG's floored column
profile, WaNet's integer displacement field and its splitmix64 noise, label-consistent's
int8 perturbations), moves them to the device once per (device, window size), and
does integer arithmetic and table look-ups only, as the numba kernels do: pixel-exact
with ``Attack.apply`` by construction (tests/attacks/test_device_twins.py holds them to
it and to the FFCV loader's output).

Windows of another size than the frame go through the same nearest-neighbour maps
(``nearest_index``) as the references; decode-size data has window == frame, where the
maps are the identity.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from engine.attacks.base import Attack, nearest_index
from engine.errors import UserError

# Twin classes by attack name; a twin registers itself by defining ``attack_name``.
TWINS: dict[str, type["DeviceTrigger"]] = {}


class DeviceTrigger(ABC):
    """An attack's trigger on uint8 NHWC tensors of one device."""

    attack_name: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "attack_name" in cls.__dict__:
            TWINS[cls.attack_name] = cls

    def __init__(self, attack: Attack):
        self.attack = attack
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def tables(self, device: torch.device, h: int, w: int) -> dict[str, torch.Tensor]:
        """The attack's tables at window ``h`` x ``w``, on ``device``: built once per key."""
        key = (str(device), h, w)
        if key not in self._cache:
            self._cache[key] = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                                for k, v in self.build_tables(h, w).items()}
        return self._cache[key]

    @abstractmethod
    def build_tables(self, h: int, w: int) -> dict[str, np.ndarray]:
        """NumPy tables at window size (h, w)."""

    @abstractmethod
    def trigger(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """A triggered copy of every image (``indices``: their dataset indices, int64, on
        the images' device)."""

    def __call__(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC RGB images, got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            return images.clone()
        return self.trigger(images, indices.to(images.device, torch.int64))

    def apply_selected(self, images: torch.Tensor, indices: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """``images`` with the trigger on those whose sample is selected
        (``selected``: bool over the dataset, on the images' device); in place."""
        idx = indices.to(images.device, torch.int64)
        hit = selected[idx]
        # Only the selected rows are triggered: a small share in a training batch.
        rows = hit.nonzero().squeeze(1)
        if rows.numel():
            images[rows] = self(images[rows], idx[rows])
        return images


def _maps(frame: tuple[int, int], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    return nearest_index(h, frame[0]), nearest_index(w, frame[1])


class PatchTwin(DeviceTrigger):
    """Pixels where the mask is set take the pattern's values (BadNets)."""

    attack_name = "badnets"

    def build_tables(self, h: int, w: int) -> dict[str, np.ndarray]:
        pattern, mask = self.attack.pattern, self.attack.mask
        rows, cols = _maps(pattern.shape[:2], h, w)
        return {"pattern": pattern[rows][:, cols], "mask": mask[rows][:, cols]}

    def trigger(self, images, indices):
        t = self.tables(images.device, images.shape[1], images.shape[2])
        return torch.where(t["mask"], t["pattern"], images)


class BlendedTwin(DeviceTrigger):
    """x + step[t - x + 255]: the step table of the Blended kernel, built by the rule."""

    attack_name = "blended"

    def build_tables(self, h: int, w: int) -> dict[str, np.ndarray]:
        from engine.attacks.triggers.blended import blend

        d = np.arange(-255, 256)
        x = np.where(d < 0, 255, 0).astype(np.uint8)
        step = blend(x, (x.astype(np.int16) + d).astype(np.uint8), self.attack.alpha).astype(np.int16) \
            - x.astype(np.int16)
        rows, cols = _maps(self.attack.pattern.shape[:2], h, w)
        # Offset by 255 here so the look-up index is pattern - x with no addition per pixel.
        return {"step": step, "pattern": self.attack.pattern[rows][:, cols].astype(np.int16) + 255}

    def trigger(self, images, indices):
        t = self.tables(images.device, images.shape[1], images.shape[2])
        x = images.to(torch.int16)
        index = (t["pattern"] - x).to(torch.int32).reshape(-1)  # int32: half the memory of int64
        return (x + t["step"].index_select(0, index).view_as(x)).to(torch.uint8)


class SIGTwin(DeviceTrigger):
    """x + floored sinusoid of the column, clipped."""

    attack_name = "sig"

    def build_tables(self, h: int, w: int) -> dict[str, np.ndarray]:
        profile = self.attack.profile
        return {"offsets": profile[nearest_index(w, len(profile))].astype(np.int16)}

    def trigger(self, images, indices):
        t = self.tables(images.device, images.shape[1], images.shape[2])
        shifted = images.to(torch.int16) + t["offsets"].view(1, 1, -1, 1)
        return shifted.clamp_(0, 255).to(torch.uint8)


def _signed(v) -> int:
    """A uint64 constant as the int64 of the same bits (torch's arithmetic is signed)."""
    return int(np.asarray(v, np.uint64).view(np.int64))


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 bit patterns: wrapping multiplication is the
    same in two's complement as in uint64 (engine.attacks.triggers.wanet._mix)."""
    from engine.attacks.triggers.wanet import _M1, _M2

    z = (z ^ _shr(z, 30)) * _signed(_M1)
    z = (z ^ _shr(z, 27)) * _signed(_M2)
    return z ^ _shr(z, 31)


def _umod(z: torch.Tensor, m: int) -> torch.Tensor:
    """The uint64 value of ``z``'s bits modulo ``m`` (small): u = 2 (u >> 1) + (u & 1)."""
    return ((_shr(z, 1) % m) * 2 + (z & 1)) % m


class WaNetTwin(DeviceTrigger):
    """The integer warp of the WaNet kernel; noise-mode samples hash their jitter on the device."""

    attack_name = "wanet"

    def build_tables(self, h: int, w: int) -> dict[str, np.ndarray]:
        from engine.attacks.triggers.wanet import Q, _scale, scale_factor

        field = self.attack.field
        ph, pw = field.shape[:2]
        rows, cols = _maps((ph, pw), h, w)
        d = field[rows][:, cols].astype(np.int64)
        fy, fx = scale_factor(h, ph), scale_factor(w, pw)
        sy = np.clip(np.arange(h)[:, None] * Q + _scale(d[..., 0], fy), 0, (h - 1) * Q)
        sx = np.clip(np.arange(w)[None, :] * Q + _scale(d[..., 1], fx), 0, (w - 1) * Q)
        return {"sy": sy, "sx": sx, "pos": (rows[:, None] * pw + cols[None, :]) * 2}

    def trigger(self, images, indices):
        from engine.attacks.triggers.wanet import Q, SCALE_BITS, scale_factor

        n, h, w = images.shape[:3]
        t = self.tables(images.device, h, w)
        sy, sx = t["sy"].expand(n, h, w), t["sx"].expand(n, h, w)
        a = self.attack
        if a.noise is not None:
            noisy = self._noise_mask(images.device)[indices]
            rows = noisy.nonzero().squeeze(1)
            if rows.numel():
                ny, nx = self._noise(indices[rows], t["pos"])
                ph, pw = a.field.shape[:2]
                fy, fx = scale_factor(h, ph), scale_factor(w, pw)
                sy, sx = sy.clone(), sx.clone()
                sy[rows] = (sy[rows] + ((ny * fy) >> SCALE_BITS)).clamp_(0, (h - 1) * Q)
                sx[rows] = (sx[rows] + ((nx * fx) >> SCALE_BITS)).clamp_(0, (w - 1) * Q)
        return _bilinear(images, sy, sx)

    def _noise_mask(self, device) -> torch.Tensor:
        key = (str(device), "noise")
        if key not in self._cache:
            self._cache[key] = {"noise": torch.from_numpy(self.attack.noise).to(device)}
        return self._cache[key]["noise"]

    def _noise(self, indices: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The jitter (y, x) in 1/Q frame pixels of each sample: ``wanet.noise_values``."""
        from engine.attacks.triggers.wanet import _NOISE_DOMAIN
        from engine.attacks.triggers.wanet import _mix as np_mix

        a = self.attack
        seed_key = _signed(np_mix(np.asarray([a.noise_seed], np.uint64) ^ _NOISE_DOMAIN)[0])
        base = _mix(indices + seed_key)[:, None, None]
        amp_y, amp_x = a.amplitude
        ny = _umod(_mix(base + pos), 2 * amp_y + 1) - amp_y
        nx = _umod(_mix(base + pos + 1), 2 * amp_x + 1) - amp_x
        return ny, nx


def _bilinear(images: torch.Tensor, sy: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    """Resample at (sy, sx) in 1/Q px, rounding like the kernel; int32 holds every term
    (at most Q * Q * 255)."""
    from engine.attacks.triggers.wanet import Q, SHIFT

    n, h, w = images.shape[:3]
    y0, x0 = sy // Q, sx // Q
    fy, fx = (sy % Q).to(torch.int32)[..., None], (sx % Q).to(torch.int32)[..., None]
    y1, x1 = (y0 + 1).clamp_(max=h - 1), (x0 + 1).clamp_(max=w - 1)
    b = torch.arange(n, device=images.device).view(n, 1, 1)
    p = images.to(torch.int32)
    top = (Q - fx) * p[b, y0, x0] + fx * p[b, y0, x1]
    bottom = (Q - fx) * p[b, y1, x0] + fx * p[b, y1, x1]
    return (((Q - fy) * top + fy * bottom + (Q * Q) // 2) >> SHIFT).to(torch.uint8)


class LabelConsistentTwin(PatchTwin):
    """The sample's perturbation added and clipped (training variant), then the corners."""

    attack_name = "label_consistent"

    def trigger(self, images, indices):
        a = self.attack
        if a.rows is not None:
            images = self._perturbed(images, indices)
        return super().trigger(images, indices)

    def _perturbed(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, h, w = images.shape[:3]
        dev = images.device
        key = (str(dev), "perturbations")
        if key not in self._cache:
            # The whole cache, once: one frame per target-class image, int8.
            a = self.attack
            self._cache[key] = {"rows": torch.from_numpy(a.rows).to(dev),
                                # a copy: the cache is a read-only map
                                "delta": torch.from_numpy(np.array(a.perturbations)).to(dev)}
        c = self._cache[key]
        row = c["rows"][indices].long()
        has = row >= 0
        ph, pw = c["delta"].shape[1:3]
        rmap = torch.from_numpy(nearest_index(h, ph)).to(dev)
        cmap = torch.from_numpy(nearest_index(w, pw)).to(dev)
        delta = c["delta"][row.clamp(min=0)][:, rmap][:, :, cmap].to(torch.int16)
        delta = delta * has.view(n, 1, 1, 1)  # samples without a perturbation get none
        return (images.to(torch.int16) + delta).clamp_(0, 255).to(torch.uint8)


def device_twin(attack: Attack) -> DeviceTrigger:
    """The device twin of ``attack`` (one per attack object, so tables are moved once)."""
    twin = getattr(attack, "_device_twin", None)
    if twin is None:
        cls = TWINS.get(getattr(attack, "name", ""))
        if cls is None:
            raise UserError(f"attack {getattr(attack, 'name', type(attack).__name__)!r} has no device twin, so "
                            f"data.decode_device=cuda cannot trigger it: use data.decode_device=cpu "
                            f"(attacks with one: {', '.join(sorted(TWINS))})")
        twin = cls(attack)
        attack._device_twin = twin
    return twin



@dataclass
class DevicePoison:
    """An attack's contribution to the GPU-decode loader (``engine.data.gpu_decode``), the
    device counterpart of ``engine.attacks.ops.AttackOps``: the trigger (its device
    twin), the samples that get it and the labels after poisoning (None: unchanged)."""

    attack: Attack
    selected: np.ndarray  # bool per sample of the split
    new_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.twin = device_twin(self.attack)  # fails now for an attack without a twin
        self._selected_on: dict[torch.device, torch.Tensor] = {}

    def apply(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``images`` (uint8 NHWC) of the samples at ``positions`` in the file, the selected
        ones triggered, in place."""
        dev = images.device
        if dev not in self._selected_on:
            self._selected_on[dev] = torch.from_numpy(np.asarray(self.selected, bool)).to(dev)
        return self.twin.apply_selected(images, positions.to(dev), self._selected_on[dev])

    @classmethod
    def of(cls, runtime, split: str) -> "DevicePoison | None":
        """The training or test poisoning of a ``PoisonRuntime``, like its
        ``train_ops()`` / ``test_ops()`` (which build FFCV operations instead)."""
        if split == "train":
            attack = runtime.train_attack()
            if attack is None:
                return None
            plan = runtime.plan
            changed = bool((plan.labels != plan.true_labels).any())
            return cls(attack, np.asarray(runtime.train_selected, bool), plan.labels if changed else None)
        attack = runtime.test_attack()
        return None if attack is None else cls(attack, np.ones(len(runtime.test_labels), bool))

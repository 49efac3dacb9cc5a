"""``data.trigger_device: device``: the CPU loader delivers clean pixels, the trigger is
drawn on the run's device right after.

Why: on ImageNet-size JPEG data the CPU loader is what feeds the GPUs, and a trigger
that resamples the whole 256 px frame (WaNet: about 0.9 ms per image on one core, six
times the JPEG decode) costs the loader more than the decode itself. On a GPU the same
warp of a whole batch takes microseconds. The attack's device twin
(``engine.attacks.device``) draws the trigger; the twins are held pixel-exact against
the loader's own kernels (tests/attacks/test_device_twins.py), so this setting changes
where the work is done, never a pixel, and it is left out of every stage's key
(``engine.stages.keys.SPEED_ONLY``).

What stays in the loader: the label changes, by index, as before. What moves: the image
operation, applied to each batch after it reaches the device, keyed by the sample's
index in the file (the loader's third output; ``dbd prepare`` writes sample ``i`` with
index ``i``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch


@dataclass(frozen=True)
class DeviceSideOps:
    """A split's poisoning with the trigger on the device: the loader's operations (of
    which only the label changes are used) and the attack's device twin."""

    loader_ops: Any  # engine.attacks.ops.AttackOps
    device: Any  # engine.attacks.device.DevicePoison


class LabelOnlyOps:
    """An attack's loader operations without its image part (``engine.data.loaders.PoisonOps``)."""

    def __init__(self, ops: Any):
        self.ops = ops

    def image_decoder(self, *, fixed_size: bool, decode_size: int, train: bool) -> None:
        return None  # the default decoder: clean pixels

    def image_ops(self) -> list:
        return []

    def label_ops(self) -> list:
        return self.ops.label_ops()


class DeviceTriggeredLoader:
    """An FFCV loader whose batches get the attack's trigger on the device they arrive on.

    It is used as the FFCV loader is: ``next_epoch``, ``indices``, ``len()`` and
    iteration pass through; ``set_indices`` points the inner loader at a subset."""

    def __init__(self, loader: Any, poison: Any):
        self.loader = loader
        self.poison = poison  # engine.attacks.device.DevicePoison

    @property
    def next_epoch(self) -> int:
        return self.loader.next_epoch

    @next_epoch.setter
    def next_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    @property
    def indices(self):
        return self.loader.indices

    def set_indices(self, indices: Sequence[int]) -> None:
        from engine.data.loaders import set_indices

        set_indices(self.loader, indices)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return _Triggered(iter(self.loader), self.poison)


class _Triggered:
    """One epoch's batches; ``close`` stops the inner iterator (and FFCV's threads)."""

    def __init__(self, inner: Iterator, poison: Any):
        self.inner, self.poison = inner, poison

    def __iter__(self) -> "_Triggered":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, indices = next(self.inner)
        return self.poison.apply(images, indices), labels, indices

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

"""The run's data: every loader a stage needs, built from the ``data`` config section.

One place decides what all loaders share: the decode size of variable-size data, FFCV's
``os_cache`` and worker threads, the rank sharding, the per-epoch order, and which
poisoning operations go into the pipeline (the training ones for the training split,
the test ones for the poisoned test set). Stages ask for loaders by purpose and never
build an FFCV pipeline themselves. ``data.decode_device: cuda`` swaps every loader for
``engine.data.gpu_decode``'s (nvJPEG, the trigger on the device), same batches and order;
``data.trigger_device: device`` keeps the CPU decode and draws the trigger on the device
(``engine.data.device_trigger``), same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from engine.data.device_trigger import DeviceSideOps, DeviceTriggeredLoader, LabelOnlyOps
from engine.data.loaders import LoaderSpec, make_loader, set_indices
from engine.errors import UserError

EVAL_BATCH = 256  # evaluation, the split's loss pass and the feature dump


@dataclass(frozen=True)
class DatasetMeta:
    """The typed view of a dataset's ``meta.json`` (written by ``dbd prepare``)."""

    name: str
    num_classes: int
    classes: tuple[str, ...]
    train_count: int
    test_count: int
    fixed_size: bool
    content_hash: str
    raw: dict  # the file itself, for the attack layer and the records

    @classmethod
    def from_raw(cls, raw: dict) -> "DatasetMeta":
        try:
            return cls(name=str(raw.get("name", "")), num_classes=int(raw["num_classes"]),
                       classes=tuple(str(c) for c in raw.get("classes", ())),
                       train_count=int(raw["splits"]["train"]["count"]), test_count=int(raw["splits"]["test"]["count"]),
                       fixed_size=bool(raw.get("fixed_size", False)), content_hash=str(raw.get("content_hash", "")),
                       raw=raw)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"dataset meta.json is missing or has a bad field ({e}): "
                            "prepare the dataset again") from None


class RunData:
    """Loaders over the run's dataset for one process (rank ``dist.rank`` of ``dist.world_size``)."""

    def __init__(self, config, meta: DatasetMeta, dist, seed: int, poison=None):
        self.config = config  # the ``data`` section
        self.meta = meta
        self.dist = dist
        self.seed = seed
        self.poison = poison  # engine.attacks.runtime.PoisonRuntime, None for clean data
        self.gpu_decode = getattr(config, "decode_device", "cpu") == "cuda"
        self.trigger_on_device = getattr(config, "trigger_device", "loader") == "device"
        if self.gpu_decode:
            self._check_gpu_decode()

    def _check_gpu_decode(self) -> None:
        """data.decode_device=cuda decodes JPEG files with nvJPEG into a CUDA run's device."""
        writer = self.meta.raw.get("writer") or {}
        if self.meta.fixed_size or writer.get("write_mode", "jpg") != "jpg":
            raise UserError(f"data.decode_device=cuda needs variable-size JPEG data, but {self.config.root} holds "
                            f"{'fixed-size' if self.meta.fixed_size else writer.get('write_mode')} images: "
                            f"use data.decode_device=cpu")
        if getattr(self.dist.device, "type", str(self.dist.device)) != "cuda":
            raise UserError("data.decode_device=cuda needs a CUDA run (device), this one runs on "
                            f"{self.dist.device}: use data.decode_device=cpu")

    def _loader(self, split: str, batch_size: int, *, shuffle: bool, drop_last: bool, indices=None,
                seed: int = 0, sharded: bool = False, train: bool, poison_ops=None):
        c = self.config
        spec = LoaderSpec(root=c.root, split=split, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          seed=seed, rank=self.dist.rank if sharded else 0,
                          world_size=self.dist.world_size if sharded else 1, num_workers=c.num_workers,
                          indices=indices, decode_size=c.decode_side, train=train, os_cache=c.os_cache,
                          device=str(self.dist.device))
        if self.gpu_decode:
            from engine.data.gpu_decode import make_gpu_loader

            return make_gpu_loader(spec, poison_ops)  # poison_ops: a DevicePoison here
        if isinstance(poison_ops, DeviceSideOps):
            return DeviceTriggeredLoader(make_loader(spec, poison=LabelOnlyOps(poison_ops.loader_ops)),
                                         poison_ops.device)
        return make_loader(spec, poison=poison_ops)

    def _ops(self, split: str):
        """The poisoning of ``split``'s loaders: FFCV operations, or for the GPU decode the
        attack's device twin (engine.attacks.device.DevicePoison)."""
        if self.poison is None:
            return None
        if self.gpu_decode:
            return self.poison.device_ops(split)
        ops = self.poison.train_ops() if split == "train" else self.poison.test_ops()
        if ops is not None and self.trigger_on_device:
            return DeviceSideOps(ops, self.poison.device_ops(split))
        return ops

    def _train_ops(self):
        return self._ops("train")

    def train_loader(self, per_rank_batch: int, *, indices: Sequence[int] | None = None, stream: str = "train"):
        """The (poisoned) training set or a subset of it, shuffled per epoch, sharded by rank.

        Its order is the seed stream ``order/<stream>``: loaders with different
        ``stream`` names have independent orders."""
        from engine.runtime.seeds import stream_seed

        return self._loader("train", per_rank_batch, shuffle=True, drop_last=True, indices=indices,
                            seed=stream_seed(self.seed, f"order/{stream}"), sharded=True, train=True,
                            poison_ops=self._train_ops())

    def scoring_loader(self, indices: Sequence[int]):
        """Training samples in index order, as training frames them (the split's loss pass)."""
        return self._loader("train", EVAL_BATCH, shuffle=False, drop_last=False, indices=indices, train=True,
                            poison_ops=self._train_ops())

    def feature_loader(self, indices: Sequence[int]):
        """Training samples in index order, with the trigger, framed like test images."""
        return self._loader("train", EVAL_BATCH, shuffle=False, drop_last=False, indices=indices, train=False,
                            poison_ops=self._train_ops())

    def test_loader(self, indices: Sequence[int], *, poisoned: bool):
        """Test images ``indices`` (clean, or with the test trigger)."""
        ops = self._ops("test") if poisoned else None
        return self._loader("test", EVAL_BATCH, shuffle=False, drop_last=False, indices=indices, train=False,
                            poison_ops=ops)

    @staticmethod
    def set_subset(loader, indices: Sequence[int]) -> None:
        """Point a loader at another subset without rebuilding it (a rebuild recompiles)."""
        if hasattr(loader, "set_indices"):  # the GPU-decode loader
            loader.set_indices(indices)
        else:
            set_indices(loader, indices)

    @staticmethod
    def epoch(loader, epoch: int) -> Iterator:
        """The batches of ``loader`` in epoch ``epoch``'s order (a pure function of the epoch).

        The one way every stage starts an epoch; the iterator is closed when the
        consumer stops early, so FFCV's worker threads never outlive the epoch."""
        loader.next_epoch = epoch
        it = iter(loader)
        try:
            yield from it
        finally:
            it.close()

    @classmethod
    def endless(cls, loader, epoch: int) -> Iterator:
        """Batches without end for training epoch ``epoch``: the loader restarts with a
        new order each time it runs out (pass k of the epoch is order ``(epoch, k)``,
        folded into one number that no other (epoch, k) gives)."""
        from kernels import mix_seed

        k = 0
        while True:
            yield from cls.epoch(loader, mix_seed(epoch, k, 0, 0))
            k += 1

    def train_labels(self) -> np.ndarray:
        """The training labels after poisoning."""
        return np.asarray(self.poison.plan.labels)

    def poisoned_mask(self) -> np.ndarray:
        if self.poison is None:
            return np.zeros(self.meta.train_count, dtype=bool)
        return np.asarray(self.poison.plan.poisoned, dtype=bool)

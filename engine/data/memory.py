"""The run's data held in memory: :class:`RunData`'s loaders over uint8 arrays, no FFCV.

Where FFCV cannot be installed (a GPU container with only Python, torch and Triton),
or where a test or benchmark wants the real stages without writing a ``.beton``, the
stages still train: every loader a stage asks for is a :class:`MemoryLoader` over
tensors already decoded to the training size. The batches have the FFCV loaders'
layout ``(images uint8 NHWC, labels int64, indices int64)`` on the CPU, and their order
is the same :func:`engine.data.order.shard_order` (epoch-seeded, sharded by rank), so a
stage cannot tell the two apart. The data is clean: an attack applies its trigger
inside FFCV's pipeline, which this path does not have.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from engine.data.order import shard_order
from engine.data.run_data import DatasetMeta, RunData
from engine.errors import UserError


class MemoryLoader:
    """Batches of ``images[i], labels[i], i`` for the indices of one subset, in the epoch
    order of ``shard_order``. The FFCV loader's interface as the stages use it:
    ``indices``, ``next_epoch``, ``len()`` (batches per epoch on this rank) and iteration."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, shuffle: bool,
                 drop_last: bool, seed: int, rank: int, world_size: int, indices: Sequence[int] | None = None):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.next_epoch = 0
        self.set_indices(np.arange(len(labels)) if indices is None else indices)

    def set_indices(self, indices: Sequence[int]) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            raise UserError("loader was given an empty index subset")
        n = len(self.labels)
        if idx.min() < 0 or idx.max() >= n:
            raise UserError(f"loader subset has indices outside [0, {n})")
        self.indices = idx

    def _order(self) -> np.ndarray:
        return shard_order(self.indices, seed=self.seed, epoch=self.next_epoch, shuffle=self.shuffle,
                           rank=self.rank, world_size=self.world_size)

    def __len__(self) -> int:
        per_rank = len(self._order())
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = torch.from_numpy(self._order())
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                return
            yield self.images[idx], self.labels[idx], idx


def _as_images(images, what: str) -> torch.Tensor:
    t = torch.as_tensor(images)
    if t.dtype != torch.uint8 or t.dim() != 4 or t.shape[3] != 3:
        raise UserError(f"in-memory {what} images must be uint8 (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return t.contiguous()


def _as_labels(labels, n: int, num_classes: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(labels).to(torch.int64).reshape(-1)
    if len(t) != n:
        raise UserError(f"in-memory {what} set has {n} images but {len(t)} labels")
    if len(t) and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise UserError(f"in-memory {what} labels must lie in [0, {num_classes})")
    return t


class MemoryData(RunData):
    """:class:`RunData` whose loaders read in-memory arrays (clean data, no attack).

    ``train`` and ``test`` are ``(images uint8 (N, S, S, 3), labels)`` at the training
    size ``config.image_size``; ``config`` is the ``data`` section (normalisation, flips)."""

    def __init__(self, config, dist, seed: int, *, train, test, num_classes: int, name: str = "memory"):
        images, test_images = _as_images(train[0], "training"), _as_images(test[0], "test")
        for what, t in (("training", images), ("test", test_images)):
            if t.shape[1] != config.image_size or t.shape[2] != config.image_size:
                raise UserError(f"in-memory {what} images are {t.shape[1]}x{t.shape[2]} but data.image_size is "
                                f"{config.image_size}: resize them first")
        self.images, self.labels = images, _as_labels(train[1], len(images), num_classes, "training")
        self.test_images = test_images
        self.test_labels = _as_labels(test[1], len(test_images), num_classes, "test")
        meta = DatasetMeta(name=name, num_classes=num_classes, classes=tuple(str(c) for c in range(num_classes)),
                           train_count=len(images), test_count=len(test_images), fixed_size=True,
                           content_hash="", raw={})
        super().__init__(config, meta, dist, seed, poison=None)

    def _loader(self, split: str, batch_size: int, *, shuffle: bool, drop_last: bool, indices=None,
                seed: int = 0, sharded: bool = False, train: bool, poison_ops=None):
        # poison_ops is always None here (no attack); ``train`` only changes how FFCV
        # frames variable-size data, and these images are already at the training size.
        images, labels = (self.images, self.labels) if split == "train" else (self.test_images, self.test_labels)
        return MemoryLoader(images, labels, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed,
                            rank=self.dist.rank if sharded else 0, world_size=self.dist.world_size if sharded else 1,
                            indices=indices)

    @staticmethod
    def set_subset(loader, indices: Sequence[int]) -> None:
        loader.set_indices(indices)

    def train_labels(self) -> np.ndarray:
        return self.labels.numpy()

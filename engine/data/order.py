"""The sample order every loader uses: epoch-seeded, sharded by rank, subset-able.

FFCV's RANDOM order goes through torch's DistributedSampler (needs an initialised
process group even to build a loader) and its SEQUENTIAL/RANDOM orders cannot be
re-seeded per epoch from outside. This order is a pure function of
(indices, seed, epoch, rank, world_size): every rank draws the same permutation and
takes its own stride of it, so resuming at an epoch reproduces that epoch exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from ffcv.traversal_order.base import TraversalOrder


def shard_order(indices: np.ndarray, *, seed: int, epoch: int, shuffle: bool, rank: int,
                world_size: int) -> np.ndarray:
    order = np.asarray(indices, dtype=np.int64)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(order)
    if world_size > 1:
        # Pad by wrapping around (as DistributedSampler does) so every rank gets the
        # same number of samples and collectives stay in step.
        per_rank = -(-len(order) // world_size)
        pad = per_rank * world_size - len(order)
        if pad:
            order = np.concatenate([order, order[:pad]])
        order = order[rank::world_size]
    return order


class ShardedOrder(TraversalOrder):
    """FFCV traversal order built from an instance: FFCV calls ``order(loader)``."""

    def __init__(self, *, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size

    def __call__(self, loader) -> "ShardedOrder":
        self.loader = loader
        self.indices = np.asarray(loader.indices, dtype=np.int64)
        self.distributed = False
        self.sampler = None
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        return shard_order(self.indices, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                           rank=self.rank, world_size=self.world_size)


# FFCV checks ``isinstance(order, TraversalOrder)`` and then calls ``order(loader)``:
# an instance with __call__ satisfies both.

"""The sample order every loader uses: epoch-seeded, sharded by rank, subset-able.

FFCV's RANDOM order goes through torch's DistributedSampler (needs an initialised
process group even to build a loader) and its SEQUENTIAL/RANDOM orders cannot be
re-seeded per epoch from outside. This order is a pure function of
(indices, seed, epoch, rank, world_size): every rank draws the same permutation and
takes its own stride of it, so resuming at an epoch reproduces that epoch exactly.

FFCV is imported only inside :func:`sharded_order_class`: the in-memory loader
(``engine.data.memory``) shares :func:`shard_order`, and the stages import this
package's modules where FFCV is not installed.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


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


@functools.cache
def sharded_order_class() -> type:
    """The FFCV traversal order built from an instance (FFCV calls ``order(loader)``).

    FFCV checks ``isinstance(order, TraversalOrder)`` and then calls ``order(loader)``:
    an instance with ``__call__`` satisfies both. The class is made on first use, so
    importing this module never imports FFCV; it is cached, so ``isinstance`` against
    it is stable."""
    from ffcv.traversal_order.base import TraversalOrder

    class ShardedOrder(TraversalOrder):
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

    return ShardedOrder

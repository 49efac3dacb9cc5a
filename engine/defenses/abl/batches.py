"""Batches as the reference's DataLoaders cut them: a given order, the last batch kept.

The engine's training loader shuffles and drops the last partial batch. ABL's
reference does neither everywhere: its isolation loader runs in index order, and all
its loaders keep a partial last batch (500 isolated images at batch 128 are 4 ascent
steps, not 3). Here an epoch's global order is cut into global batches; each is split
over the ranks as evenly as ``np.array_split`` splits it, and this rank's pieces are
read in order through the run's in-order loader and re-cut to their sizes. A tail batch
smaller than the world size is skipped on every rank (1 process: never).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch


def epoch_order(indices: np.ndarray, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order of ``indices``: as given, or a permutation that is a pure
    function of (seed, epoch), the same on every rank."""
    indices = np.asarray(indices, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(indices) if shuffle else indices


def rank_pieces(order: np.ndarray, batch: int, rank: int, world_size: int) -> tuple[np.ndarray, list[int]]:
    """This rank's indices, in order, and the size of its piece of each global batch."""
    parts, sizes = [], []
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        if len(chunk) < world_size:
            continue
        part = np.array_split(chunk, world_size)[rank]
        parts.append(part)
        sizes.append(len(part))
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)), sizes


def global_steps(count: int, batch: int, world_size: int) -> int:
    """Steps of one pass over ``count`` samples (the partial last batch included)."""
    full, tail = divmod(count, batch)
    return full + (1 if tail >= world_size else 0)


def recut(batches: Iterable[Sequence[torch.Tensor]], sizes: Sequence[int]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Loader batches ``(images, labels, indices)`` re-cut into consecutive pieces of ``sizes``."""
    source = iter(batches)
    pending: tuple[torch.Tensor, ...] | None = None
    for size in sizes:
        while pending is None or len(pending[1]) < size:
            nxt = next(source, None)
            if nxt is None:
                raise RuntimeError(f"ABL: the loader ran out before a batch of {size}")
            pending = tuple(nxt) if pending is None else tuple(torch.cat([p, q]) for p, q in zip(pending, nxt))
        yield tuple(p[:size] for p in pending)
        pending = tuple(p[size:] for p in pending)

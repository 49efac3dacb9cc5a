"""ASD's three rules for the clean pool, and its clean seeds.

Every rule reads one loss per training sample (the epoch's record) and returns the pool's
indices, sorted; ties go to the lower index, as in DBD's split:

- ``class_aware_pool``: the seeds plus, for each class c, the ``per_class`` lowest losses
  among the non-seed samples *labelled* c (the given, possibly poisoned, label);
- ``lowest_share`` (class-agnostic, and the meta-split on its scores): the lowest
  ``int(epsilon * N)`` over the whole set;
- ``per_class_at``: the class-aware growth, a function of the epoch alone, so a resumed
  run draws the pool an uninterrupted one draws (the reference keeps a counter that a
  resume resets to 0).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.defenses.dbd.split import select_lowest
from engine.errors import UserError


def per_class_at(epoch: int, growth: int, every: int) -> int:
    """Samples per class the class-aware rule adds to the seeds at ``epoch``: ``growth``
    more every ``every`` epochs from 0 (the reference: 0 at epochs 0-4, 10 at 5-9, ...)."""
    return growth * (epoch // every)


def class_aware_pool(losses: np.ndarray, labels: np.ndarray, seeds: np.ndarray, per_class: int,
                     num_classes: int) -> np.ndarray:
    chosen = [np.asarray(seeds, dtype=np.int64)]
    non_seed = np.ones(len(losses), dtype=bool)
    non_seed[seeds] = False
    for c in range(num_classes):
        idx = np.flatnonzero((labels == c) & non_seed)
        chosen.append(idx[np.lexsort((idx, losses[idx]))][:per_class])
    return np.sort(np.concatenate(chosen))


def lowest_share(scores: np.ndarray, epsilon: float) -> np.ndarray:
    return select_lowest(scores, epsilon)[0]


def oracle_seeds(poisoned: np.ndarray, labels: np.ndarray, per_class: int, num_classes: int,
                 rng: np.random.Generator) -> np.ndarray:
    """``per_class`` samples of every class drawn without replacement among those that are
    not poisoned: the ground truth a real defender does not have (the reference's rule)."""
    seeds = []
    for c in range(num_classes):
        clean = np.flatnonzero((labels == c) & ~poisoned)
        if len(clean) < per_class:
            raise UserError(f"asd: class {c} has {len(clean)} clean training samples, fewer than "
                            f"asd.seeds_per_class={per_class}")
        seeds.append(rng.choice(clean, per_class, replace=False))
    return np.sort(np.concatenate(seeds))


def trusted_seeds(path: str, n: int) -> np.ndarray:
    """A trusted index list: ``.npy``, or text with one index per line or separated by commas."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"asd.seeds: {path} is not a file (oracle, or a file of trusted training indices)")
    try:
        raw = np.load(p) if p.suffix == ".npy" else np.array(p.read_text().replace(",", " ").split(), dtype=np.int64)
    except ValueError as e:
        raise UserError(f"asd.seeds: {path} is not a list of integers ({e})") from None
    seeds = np.unique(np.asarray(raw, dtype=np.int64))
    if not len(seeds) or seeds.min() < 0 or seeds.max() >= n:
        raise UserError(f"asd.seeds: {path} must hold training indices in [0, {n}), got {len(seeds)} "
                        f"from {seeds.min() if len(seeds) else '-'} to {seeds.max() if len(seeds) else '-'}")
    return seeds

"""Batch-size semantics and learning-rate scaling, in one place for every stage.

``distributed.batch_semantics``:
  * ``global``: a stage's ``batch_size`` is the batch of one optimizer step summed over
    ranks; each rank takes ``batch_size / world_size``, so changing the number of
    processes changes nothing about the optimisation (the learning rate stays as is).
  * ``per_rank``: every rank takes the full ``batch_size``; the step's batch grows with
    the world size, and ``distributed.lr_scaling`` (none | linear | sqrt) says how the
    learning rate follows it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.errors import UserError


@dataclass(frozen=True)
class BatchPlan:
    configured: int  # the stage's batch_size as written in the config
    per_rank: int
    global_batch: int  # samples per optimizer step over all ranks
    lr_factor: float  # multiply the configured learning rate by this

    def scale_lr(self, lr: float) -> float:
        return lr * self.lr_factor


def plan_batch(batch_size: int, distributed, world_size: int, key: str) -> BatchPlan:
    """The per-rank batch for ``batch_size`` (config key ``key``), validated; ``distributed``
    is the config's section (batch semantics, learning-rate scaling)."""
    if batch_size < 1:
        raise UserError(f"config: {key} must be >= 1, got {batch_size}")
    semantics = distributed.batch_semantics
    if semantics == "global":
        if batch_size % world_size:
            raise UserError(f"config: {key}={batch_size} is a global batch (distributed.batch_semantics=global) "
                            f"and must divide evenly over {world_size} processes")
        per_rank = batch_size // world_size
        global_batch = batch_size
    elif semantics == "per_rank":
        per_rank = batch_size
        global_batch = batch_size * world_size
    else:
        raise UserError(f"config: distributed.batch_semantics must be global or per_rank, got {semantics!r}")
    ratio = global_batch / batch_size
    mode = distributed.lr_scaling
    if mode == "none":
        factor = 1.0
    elif mode == "linear":
        factor = ratio
    elif mode == "sqrt":
        factor = math.sqrt(ratio)
    else:
        raise UserError(f"config: distributed.lr_scaling must be none, linear or sqrt, got {mode!r}")
    return BatchPlan(configured=batch_size, per_rank=per_rank, global_batch=global_batch, lr_factor=factor)


def steps_per_epoch(num_samples: int, batching: BatchPlan, iterations_per_epoch: int, *, drop_last: bool = True) -> int:
    """Optimizer steps in one epoch: one pass over the (sharded) data, capped if asked."""
    full = num_samples // batching.global_batch if drop_last else -(-num_samples // batching.global_batch)
    if full < 1:
        raise UserError(f"{num_samples} training samples make no full batch of {batching.global_batch}")
    return min(full, iterations_per_epoch) if iterations_per_epoch > 0 else full

"""Pieces the classifier stages (supervised, linear, finetune) share."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.data.loaders import LoaderSpec, make_loader
from engine.stages.evaluate import Evaluator


def train_loader(ctx, per_rank_batch: int, *, indices: Sequence[int] | None = None, seed_offset: int = 0,
                 drop_last: bool = True):
    """The poisoned training set (or a subset), shuffled per epoch, sharded by rank."""
    cfg, dist = ctx.cfg, ctx.dist
    return make_loader(
        LoaderSpec(root=cfg.data.root, split="train", batch_size=per_rank_batch, shuffle=True, drop_last=drop_last,
                   seed=cfg.seed + seed_offset, rank=dist.rank, world_size=dist.world_size,
                   num_workers=cfg.data.num_workers, indices=indices,
                   decode_size=cfg.data.decode_size or cfg.data.image_size, train=True, os_cache=cfg.data.os_cache),
        poison=ctx.poison.train_ops() if ctx.poison is not None else None)


def epoch_batches(loader, epoch: int):
    """The loader's batches for ``epoch`` (its order is a pure function of the epoch)."""
    loader.next_epoch = epoch
    return loader


def num_train(ctx) -> int:
    return int(ctx.meta["splits"]["train"]["count"])


class EpochEval:
    """Scores the model after each epoch (every ``every`` epochs and the last) and logs it."""

    def __init__(self, ctx, module_fn, epochs: int, every: int = 1):
        self.ctx = ctx
        self.module_fn = module_fn
        self.epochs = epochs
        self.every = max(1, every)
        self.evaluator = Evaluator(ctx)
        self.last: dict = {}

    def __call__(self, epoch: int) -> dict:
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return {}
        self.last = self.evaluator(self.module_fn())
        if self.ctx.dist.is_main:
            self.ctx.metrics.log("eval", epoch=epoch, **self.last)
        return dict(self.last)


def load_weights(module: torch.nn.Module, path, prefix: str = "", strict_prefix: bool = True) -> None:
    """Load ``path`` (a state dict) into ``module``; with ``prefix`` only those keys."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if prefix:
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(prefix)]
        if strict_prefix and (missing or unexpected):
            raise RuntimeError(f"{path}: {prefix}* weights do not fit the model "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    else:
        module.load_state_dict(state)


def labels_of(ctx) -> np.ndarray:
    return np.asarray(ctx.poison.plan.labels)

"""Backbone features of a fixed sample of training images, for the report's 2-D map.

The sample holds every poisoned image up to half the budget plus clean images, all
triggered exactly as training saw them and with no augmentation, so the picture shows
where the trigger puts poisoned samples in each backbone's feature space.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data.loaders import LoaderSpec, make_loader
from engine.fsutil import atomic_path
from engine.stages.evaluate import autocast
from engine.stages.views import eval_view

FEATURES = "features.npz"


def feature_sample(poisoned: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 7])
    pois = np.flatnonzero(poisoned)
    clean = np.flatnonzero(~poisoned)
    take_p = rng.permutation(pois)[: min(len(pois), n // 2)]
    take_c = rng.permutation(clean)[: n - len(take_p)]
    return np.sort(np.concatenate([take_p, take_c]))


@torch.no_grad()
def save_features(ctx, backbone: torch.nn.Module, n: int = 1000) -> None:
    """Rank 0 only: write ``features.npz`` (features, true labels, poisoned flags)."""
    if not ctx.dist.is_main:
        return
    cfg = ctx.cfg
    n_train = int(ctx.meta["splits"]["train"]["count"])
    poisoned = np.zeros(n_train, dtype=bool) if ctx.poison is None else np.asarray(ctx.poison.plan.poisoned, bool)
    idx = feature_sample(poisoned, min(n, n_train), cfg.seed)
    loader = make_loader(LoaderSpec(root=cfg.data.root, split="train", batch_size=256, shuffle=False, drop_last=False,
                                    num_workers=cfg.data.num_workers, indices=idx, train=False,
                                    decode_size=cfg.data.decode_size or cfg.data.image_size),
                         poison=ctx.poison.train_ops() if ctx.poison is not None else None)
    was_training = backbone.training
    backbone.eval()
    feats, order = [], []
    for images, _, indices in loader:
        x = eval_view(cfg, images.to(ctx.dist.device))
        with autocast(cfg, ctx.dist.device):
            feats.append(backbone(x).float().cpu())
        order.append(indices.clone())
    backbone.train(was_training)
    indices = torch.cat(order).numpy()
    true = np.asarray(ctx.poison.plan.true_labels)[indices] if ctx.poison is not None else None
    with atomic_path(ctx.stage_dir / FEATURES) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=torch.cat(feats).numpy(), indices=indices, poisoned=poisoned[indices],
                     true_labels=true if true is not None else np.full(len(indices), -1))

"""Backbone features of a fixed sample of training images, for the report's 2-D map.

The sample holds every poisoned image up to half the budget plus clean images, all
triggered exactly as training saw them and with no augmentation, so the picture shows
where the trigger puts poisoned samples in each backbone's feature space.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.fsutil import atomic_path
from engine.runtime.seeds import numpy_stream
from engine.stages.views import eval_view



def feature_sample(poisoned: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = numpy_stream(seed, "feature_sample")
    pois = np.flatnonzero(poisoned)
    clean = np.flatnonzero(~poisoned)
    take_p = rng.permutation(pois)[: min(len(pois), n // 2)]
    take_c = rng.permutation(clean)[: n - len(take_p)]
    return np.sort(np.concatenate([take_p, take_c]))


@torch.no_grad()
def save_features(data, precision, backbone: torch.nn.Module, path, n: int = 1000) -> None:
    """Rank 0 only: write ``path`` (features.npz: features, true labels, poisoned flags)."""
    if not data.dist.is_main:
        return
    poisoned = data.poisoned_mask()
    idx = feature_sample(poisoned, min(n, data.meta.train_count), data.seed)
    loader = data.feature_loader(idx)
    device = data.dist.device
    was_training = backbone.training
    backbone.eval()
    feats, order = [], []
    for images, _, indices in loader:
        x = eval_view(data.config, images.to(device, non_blocking=True))
        with precision.autocast(device):
            feats.append(backbone(x).float())  # on the device: one copy at the end
        order.append(indices.clone())
    backbone.train(was_training)
    indices = torch.cat(order).numpy()
    true = np.asarray(data.poison.plan.true_labels)[indices] if data.poison is not None else None
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, features=torch.cat(feats).cpu().numpy(), indices=indices, poisoned=poisoned[indices],
                     true_labels=true if true is not None else np.full(len(indices), -1))

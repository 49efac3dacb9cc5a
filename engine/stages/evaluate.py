"""BA, ASR and RA (definitions in dbd.md), computed across ranks without duplicates.

- BA: accuracy on the clean test set.
- ASR: accuracy against the attack's target on the triggered test images whose true
  label is not their target (all-to-one: the target class; all-to-all: (y + 1) mod C,
  so every test image counts).
- RA: accuracy of those same triggered images against their true labels.
Each rank scores a disjoint stride of the test set; counts are summed across ranks,
so the figures are exact whatever the world size.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.stages.views import eval_view


class Evaluator:
    """Builds the two test loaders once per stage and scores a model on demand."""

    def __init__(self, data, precision):
        self.data = data  # engine.data.run_data.RunData
        self.precision = precision
        dist, poison = data.dist, data.poison
        self.dist = dist
        self.clean = data.test_loader(np.arange(data.meta.test_count)[dist.rank::dist.world_size], poisoned=False)
        self.poisoned = None
        if poison is not None and poison.test_ops() is not None:
            idx = np.asarray(poison.poisoned_test_indices)[dist.rank::dist.world_size]
            if len(idx):
                self.poisoned = data.test_loader(idx, poisoned=True)
            self.targets = torch.from_numpy(np.asarray(poison.test_targets, dtype=np.int64))

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module) -> dict[str, float]:
        was_training = module.training
        module.eval()
        device = self.dist.device
        try:
            # Counts stay on the device, so no batch waits for the host: one copy at the end.
            counts = torch.zeros(5, dtype=torch.float64, device=device)  # clean ok, clean n, asr, ra, poisoned n
            for images, labels, _ in self.clean:
                pred = self._predict(module, images)
                counts[0] += (pred == labels.to(device, non_blocking=True)).sum()
                counts[1] += len(labels)
            if self.poisoned is not None:
                targets = self.targets.to(device)
                for images, labels, indices in self.poisoned:
                    pred = self._predict(module, images)
                    counts[2] += (pred == targets[indices.to(device, non_blocking=True)]).sum()
                    counts[3] += (pred == labels.to(device, non_blocking=True)).sum()
                    counts[4] += len(labels)
            counts = self.dist.all_reduce_sum(counts).cpu()
        finally:
            module.train(was_training)
        out = {"BA": 100.0 * float(counts[0] / max(counts[1], 1))}
        if self.poisoned is not None:
            out["ASR"] = 100.0 * float(counts[2] / max(counts[4], 1))
            out["RA"] = 100.0 * float(counts[3] / max(counts[4], 1))
        return out

    def _predict(self, module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        device = self.dist.device
        x = eval_view(self.data.config, images.to(device, non_blocking=True))
        with self.precision.autocast(device):
            logits = module(x)
        return logits.argmax(dim=1)

"""BA, ASR and RA (definitions in dbd.md), computed across ranks without duplicates.

- BA: accuracy on the clean test set.
- ASR: accuracy against the target label on the triggered test images whose true
  label is not the target.
- RA: accuracy of those same triggered images against their true labels.
Each rank scores a disjoint stride of the test set; counts are summed across ranks,
so the figures are exact whatever the world size.
"""
from __future__ import annotations

import numpy as np
import torch

from engine.data.loaders import LoaderSpec, make_loader
from engine.stages.views import eval_view


class Evaluator:
    """Builds the two test loaders once per stage and scores a model on demand."""

    def __init__(self, ctx, batch_size: int = 256):
        self.ctx = ctx
        cfg, dist = ctx.cfg, ctx.dist
        n_test = int(ctx.meta["splits"]["test"]["count"])
        common = dict(root=cfg.data.root, split="test", batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.data.num_workers, decode_size=cfg.data.decode_size or cfg.data.image_size,
                      train=False, os_cache=cfg.data.os_cache)
        self.clean = make_loader(LoaderSpec(indices=np.arange(n_test)[dist.rank::dist.world_size], **common))
        self.poisoned = None
        if ctx.poison is not None and ctx.poison.test_ops() is not None:
            idx = np.asarray(ctx.poison.poisoned_test_indices)[dist.rank::dist.world_size]
            if len(idx):
                self.poisoned = make_loader(LoaderSpec(indices=idx, **common), poison=ctx.poison.test_ops())
            self.target = int(ctx.poison.target)

    @torch.no_grad()
    def __call__(self, module: torch.nn.Module) -> dict[str, float]:
        was_training = module.training
        module.eval()
        try:
            counts = torch.zeros(5, dtype=torch.float64)  # clean ok, clean n, asr hits, ra hits, poisoned n
            for images, labels, _ in self.clean:
                pred = self._predict(module, images)
                counts[0] += (pred == labels).sum()
                counts[1] += len(labels)
            if self.poisoned is not None:
                for images, labels, _ in self.poisoned:
                    pred = self._predict(module, images)
                    counts[2] += (pred == self.target).sum()
                    counts[3] += (pred == labels).sum()
                    counts[4] += len(labels)
            counts = _all_reduce(counts, self.ctx.dist)
        finally:
            module.train(was_training)
        out = {"BA": 100.0 * float(counts[0] / max(counts[1], 1))}
        if self.poisoned is not None:
            out["ASR"] = 100.0 * float(counts[2] / max(counts[4], 1))
            out["RA"] = 100.0 * float(counts[3] / max(counts[4], 1))
        return out

    def _predict(self, module: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        device = self.ctx.dist.device
        x = eval_view(self.ctx.cfg, images.to(device, non_blocking=True))
        with autocast(self.ctx.cfg, device):
            logits = module(x)
        return logits.argmax(dim=1).cpu()


def autocast(cfg, device: torch.device):
    if cfg.precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # CPU autocast has no fp16 kernels for convolutions
    return torch.autocast(device.type, dtype=dtype)


def _all_reduce(t: torch.Tensor, dist) -> torch.Tensor:
    if dist.world_size > 1:
        import torch.distributed as tdist

        # gloo reduces CPU tensors; NCCL needs them on the device.
        dev = dist.device if dist.backend == "nccl" else torch.device("cpu")
        t = t.to(dev)
        tdist.all_reduce(t)
        t = t.cpu()
    return t

"""The training steps of the DBD stages, rebuilt from the engine's parts for timing.

Each stage's step lives inside its ``run(ctx)`` as a closure; these rigs assemble the
same pieces (``engine.models``, ``engine.runtime.backends.build_backend``, the
``kernels`` views through ``engine.stages.views``, the stage losses) with the stage's
own settings, and split every step in two:

- ``inputs(...)``: what the engine does on the device to a loader batch (views);
- ``train(...)``: the model step on those inputs (forward, loss, backward, update).

The split lets a benchmark time the views apart from the model, and feed ``train``
from the reference DataLoader instead (benchmarks/end_to_end.py).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DS_CONFIGS = {
    "fp32": {"zero_optimization": {"stage": 0}},
    "bf16": {"zero_optimization": {"stage": 0}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    "fp16": {"zero_optimization": {"stage": 0}, "torch_autocast": {"enabled": True, "dtype": "float16"}},
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_config(*, backend: str = "ddp", precision: str = "fp32", device: str = "cpu", width: int = 64,
                data_root: str = "", num_workers: int = 2, extra: list[str] | None = None):
    """An engine Config for the rigs. DeepSpeed gets a ZeRO-0 JSON written to a temp file
    (ZeRO-0 with torch autocast: per dbd pitfalls, the safe choice for BatchNorm CNNs)."""
    from engine.config import load_config

    over = [f"distributed.backend={backend}", f"precision={precision}", f"device={device}",
            f"model.width={width}", f"data.num_workers={num_workers}", "logging.progress=false"]
    if data_root:
        over.append(f"data.root={data_root}")
    if backend == "deepspeed":
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        path = Path(tempfile.gettempdir()) / f"dbd-bench-ds-{precision}-{os.getpid()}.json"
        path.write_text(json.dumps({**DS_CONFIGS[precision], "gradient_clipping": 0.0}))
        over.append(f"distributed.deepspeed_config={path}")
    return load_config(None, over + list(extra or []))


def start(cfg):
    """The process's DistInfo (a process group only where the backend or launcher needs one)."""
    from engine.runtime.launch import init_distributed, shutdown

    shutdown()  # DistInfo is cached per process: start from nothing for each configuration
    return init_distributed(cfg)


def _rows(params, sel: slice):
    return type(params)(**{f.name: getattr(params, f.name)[sel] for f in fields(params)})


class SimCLRRig:
    """engine/stages/pretrain.py's step: two views, one forward of 2B, NT-Xent over ranks."""

    stage = "pretrain"

    def __init__(self, cfg, dist, per_rank_batch: int):
        from engine.models import SimCLRModel
        from engine.runtime.backends import build_backend
        from engine.stages.pretrain import make_optimizer_factory
        from engine.stages.views import simclr_spec

        self.cfg, self.dist = cfg, dist
        p = cfg.pretrain
        torch.manual_seed(cfg.seed)
        model = SimCLRModel(cfg.model.arch, cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim)
        self.backend = build_backend(model, make_optimizer_factory(cfg, p.lr), cfg, dist, sync_bn=p.sync_bn,
                                     per_rank_batch=per_rank_batch)
        self.backend.train()
        self.spec = simclr_spec(cfg, p.views)
        self.images_per_step = per_rank_batch

    def inputs(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        from kernels import make_generator, sample_simclr_params, simclr_views

        dev, world, rank = self.dist.device, self.dist.world_size, self.dist.rank
        images = images.to(dev, non_blocking=True)
        b, h, w = images.shape[:3]
        # As the stage does: parameters drawn for the global batch, this rank's rows kept.
        gen = make_generator(self.cfg.seed, epoch, step, 0, dev)
        params = [_rows(sample_simclr_params(b * world, h, w, self.spec, gen), slice(rank, None, world))
                  for _ in range(2)]
        views, _ = simclr_views(images, self.spec, params=params, dtype=torch.float32)
        x = torch.cat(views)
        if self.cfg.distributed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train(self, x: torch.Tensor) -> torch.Tensor:
        from engine.losses.ntxent import nt_xent

        b = x.shape[0] // 2
        self.backend.zero_grad()
        z = self.backend.forward(x)
        loss = nt_xent(z[:b], z[b:], self.cfg.pretrain.temperature, self.cfg.pretrain.loss)
        self.backend.backward(loss)
        self.backend.step()
        return loss.detach()


class LinearRig:
    """engine/stages/linear.py's step: weak view, frozen backbone (no grad), SCE on the head."""

    stage = "linear"

    def __init__(self, cfg, dist, per_rank_batch: int, num_classes: int = 10):
        from engine.models import Classifier
        from engine.runtime.backends import build_backend
        from engine.stages.linear import LinearProbe
        from engine.stages.views import WeakAugment

        self.cfg, self.dist = cfg, dist
        s = cfg.linear
        torch.manual_seed(cfg.seed)
        model = LinearProbe(Classifier(cfg.model.arch, cfg.model.width, num_classes), s.backbone_bn)
        self.backend = build_backend(model, lambda p: torch.optim.Adam([q for q in p if q.requires_grad], lr=s.lr),
                                     cfg, dist, sync_bn=False, per_rank_batch=per_rank_batch)
        self.backend.train()
        self.augment = WeakAugment(cfg, s.view)
        self.images_per_step = per_rank_batch

    def inputs(self, images, labels, epoch: int, step: int):
        dev = self.dist.device
        x = self.augment(images.to(dev, non_blocking=True), seed=self.cfg.seed, epoch=epoch, step=step,
                         rank=self.dist.rank)
        return x, labels.to(dev, non_blocking=True)

    def train(self, x, y) -> torch.Tensor:
        from engine.losses.sce import symmetric_cross_entropy

        logits = self.backend.forward(x)
        loss = symmetric_cross_entropy(logits.float(), y, self.cfg.linear.sce_alpha, self.cfg.linear.sce_beta)
        self.backend.zero_grad()
        self.backend.backward(loss)
        self.backend.step()
        return loss.detach()


class SupervisedRig(LinearRig):
    """engine/stages/supervised.py's step: weak view, the whole network, cross-entropy, SGD."""

    stage = "supervised"

    def __init__(self, cfg, dist, per_rank_batch: int, num_classes: int = 10):
        from engine.models import Classifier
        from engine.runtime.backends import build_backend
        from engine.stages.views import WeakAugment

        self.cfg, self.dist = cfg, dist
        s = cfg.supervised
        torch.manual_seed(cfg.seed)
        model = Classifier(cfg.model.arch, cfg.model.width, num_classes)
        self.backend = build_backend(
            model, lambda p: torch.optim.SGD(p, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay),
            cfg, dist, sync_bn=False, per_rank_batch=per_rank_batch)
        self.backend.train()
        self.augment = WeakAugment(cfg, s.view)
        self.images_per_step = per_rank_batch

    def train(self, x, y) -> torch.Tensor:
        logits = self.backend.forward(x)
        loss = F.cross_entropy(logits.float(), y)
        self.backend.zero_grad()
        self.backend.backward(loss)
        self.backend.step()
        return loss.detach()


class MixMatchRig:
    """engine/stages/finetune.py's step: K weak views of the unlabelled batch, label
    guessing, mixup, interleaved forwards, Lx + lambda_u * Lu, Adam over the whole model."""

    stage = "finetune"

    def __init__(self, cfg, dist, per_rank_batch: int, num_classes: int = 10):
        from engine.models import Classifier
        from engine.runtime.backends import build_backend
        from engine.stages.views import WeakAugment

        self.cfg, self.dist = cfg, dist
        s = cfg.finetune
        torch.manual_seed(cfg.seed)
        model = Classifier(cfg.model.arch, cfg.model.width, num_classes)
        self.backend = build_backend(model, lambda p: torch.optim.Adam(p, lr=s.lr), cfg, dist, sync_bn=False,
                                     per_rank_batch=per_rank_batch)
        self.backend.train()
        self.augment = WeakAugment(cfg, s.view)
        self.B = per_rank_batch
        self.num_classes = num_classes
        # Labelled and unlabelled images both count, as the stage's images_per_step does.
        self.images_per_step = 2 * per_rank_batch

    def inputs(self, x_img, x_lab, u_img, epoch: int, step: int):
        dev = self.dist.device
        kw = dict(seed=self.cfg.seed, epoch=epoch, step=step, rank=self.dist.rank)
        xb = self.augment(x_img.to(dev, non_blocking=True), salt=1, **kw)
        u_img = u_img.to(dev, non_blocking=True)
        ubs = [self.augment(u_img, salt=2 + k, **kw) for k in range(self.cfg.finetune.k_views)]
        return xb, x_lab.to(dev, non_blocking=True), ubs

    def train(self, xb, x_lab, ubs, epoch: int, step: int) -> torch.Tensor:
        from engine.losses.mixmatch import interleave, linear_rampup, mixmatch_loss, mixup, sharpen
        from engine.stages.finetune import _mix_seed

        s, B, dev = self.cfg.finetune, self.B, self.dist.device
        with torch.no_grad():
            probs = [F.softmax(o.float(), dim=1) for o in self.backend.forward_each(ubs)]
            guess = sharpen(sum(probs) / len(probs), s.temperature)
        targets = torch.cat([F.one_hot(x_lab, self.num_classes).float()] + [guess] * len(ubs))
        inputs = torch.cat([xb] + list(ubs))
        gen = torch.Generator().manual_seed(_mix_seed(self.cfg.seed, epoch, step, self.dist.rank))
        mixed_x, mixed_y, _ = mixup(inputs, targets, s.mixup_alpha, generator=gen)
        chunks = interleave(list(torch.split(mixed_x, B)), B)
        logits = interleave(self.backend.forward_each(chunks), B)
        lx, lu = mixmatch_loss(logits[0], mixed_y[:B], torch.cat(logits[1:]), mixed_y[B:])
        w = s.lambda_u * linear_rampup(epoch + step / s.iterations_per_epoch, s.rampup_epochs)
        loss = lx + w * lu
        self.backend.zero_grad()
        self.backend.backward(loss)
        self.backend.step()
        return loss.detach()


def split_halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for DBD's split: half the samples labelled, half not (epsilon 0.5)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])

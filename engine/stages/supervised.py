"""The no-defense baseline: plain supervised training on the poisoned set.

Reference: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, step decay x0.1 at
epochs 100 and 150 of 200, cross-entropy, RandomCrop(32, 4) + flip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch, steps_per_epoch
from engine.runtime.checkpoint import Checkpointer, save_final_model
from engine.stages.common import EpochEval, epoch_batches, num_train, train_loader
from engine.stages.context import MODEL
from engine.stages.features import save_features
from engine.stages.loop import run_loop
from engine.stages.views import WeakAugment


def lr_at(epoch: int, base: float, milestones, gamma: float) -> float:
    return base * gamma ** sum(epoch >= m for m in milestones)


def run(ctx) -> dict:
    cfg, dist = ctx.cfg, ctx.dist
    s = cfg.supervised
    plan = plan_batch(s.batch_size, cfg, dist.world_size, "supervised.batch_size")
    base_lr = plan.scale_lr(s.lr)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every launcher
    model = Classifier(cfg.model.arch, cfg.model.width, ctx.num_classes)
    backend = build_backend(
        model, lambda p: torch.optim.SGD(p, lr=base_lr, momentum=s.momentum, weight_decay=s.weight_decay),
        cfg, dist, sync_bn=False, per_rank_batch=plan.per_rank)
    loader = train_loader(ctx, plan.per_rank)
    augment = WeakAugment(cfg, s.view)
    steps = steps_per_epoch(num_train(ctx), plan, s.iterations_per_epoch)

    def step(batch, epoch, i):
        images, labels, _ = batch
        x = augment(images.to(dist.device, non_blocking=True), seed=cfg.seed, epoch=epoch, step=i, rank=dist.rank)
        y = labels.to(dist.device, non_blocking=True)
        logits = backend.forward(x)
        loss = F.cross_entropy(logits.float(), y)
        backend.zero_grad()
        backend.backward(loss)
        backend.step()
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    evaluate = EpochEval(ctx, lambda: backend.module, s.epochs)
    result = run_loop(ctx, backend, Checkpointer(ctx.stage_dir, backend, dist), epochs=s.epochs,
                      steps_per_epoch=steps, batches=lambda e: epoch_batches(loader, e), train_step=step,
                      images_per_step=plan.global_batch,
                      on_epoch_start=lambda e: backend.set_lr(lr_at(e, base_lr, s.milestones, s.gamma)),
                      on_epoch_end=evaluate)
    final = evaluate.last or evaluate.evaluator(backend.module)
    if dist.is_main:
        save_final_model(ctx.stage_dir / MODEL, backend.module)
    save_features(ctx, backend.module.backbone)
    return {**final, "epochs": result.epochs, "final_loss": result.last.get("loss"),
            "images_per_second": round(result.images_per_second, 1)}

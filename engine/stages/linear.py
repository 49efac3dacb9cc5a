"""DBD stage 2: the classifier head on a frozen SimCLR backbone, symmetric CE.

Reference: 10 epochs, batch 128, Adam lr 0.002, SCE alpha 0.1 beta 1, features under
no_grad. The reference leaves the whole model in train mode, so backbone BatchNorm
running statistics still move (``linear.backbone_bn: train``, the default);
``frozen`` keeps the backbone in eval mode, a truly frozen backbone.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.losses.sce import symmetric_cross_entropy
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch, steps_per_epoch
from engine.runtime.checkpoint import Checkpointer, save_final_model
from engine.stages.common import EpochEval, epoch_batches, load_weights, num_train, train_loader
from engine.stages.context import MODEL
from engine.stages.loop import run_loop
from engine.stages.views import WeakAugment


class LinearProbe(nn.Module):
    """A Classifier whose backbone runs without gradient; same state-dict keys."""

    def __init__(self, classifier: Classifier, backbone_bn: str):
        super().__init__()
        self.backbone = classifier.backbone
        self.classifier = classifier.classifier
        self.backbone_bn = backbone_bn
        for p in self.backbone.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_bn == "frozen":
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone(x)
        return self.classifier(features.float())


def run(ctx) -> dict:
    cfg, dist = ctx.cfg, ctx.dist
    s = cfg.linear
    plan = plan_batch(s.batch_size, cfg, dist.world_size, "linear.batch_size")
    torch.manual_seed(cfg.seed)  # the head's initial weights, identical on every rank
    classifier = Classifier(cfg.model.arch, cfg.model.width, ctx.num_classes)
    load_weights(classifier, ctx.upstream_model("pretrain"), prefix="backbone.")
    model = LinearProbe(classifier, s.backbone_bn)
    lr = plan.scale_lr(s.lr)
    backend = build_backend(model, lambda p: torch.optim.Adam([q for q in p if q.requires_grad], lr=lr),
                            cfg, dist, sync_bn=False, per_rank_batch=plan.per_rank)
    loader = train_loader(ctx, plan.per_rank)
    augment = WeakAugment(cfg, s.view)

    def step(batch, epoch, i):
        images, labels, _ = batch
        x = augment(images.to(dist.device, non_blocking=True), seed=cfg.seed, epoch=epoch, step=i, rank=dist.rank)
        y = labels.to(dist.device, non_blocking=True)
        logits = backend.forward(x)
        loss = symmetric_cross_entropy(logits.float(), y, s.sce_alpha, s.sce_beta)
        backend.zero_grad()
        backend.backward(loss)
        backend.step()
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    evaluate = EpochEval(ctx, lambda: backend.module, s.epochs)
    result = run_loop(ctx, backend, Checkpointer(ctx.stage_dir, backend, dist), epochs=s.epochs,
                      steps_per_epoch=steps_per_epoch(num_train(ctx), plan, s.iterations_per_epoch),
                      batches=lambda e: epoch_batches(loader, e), train_step=step,
                      images_per_step=plan.global_batch, on_epoch_end=evaluate)
    final = evaluate.last or evaluate.evaluator(backend.module)
    if dist.is_main:
        save_final_model(ctx.stage_dir / MODEL, backend.module)
    return {**final, "epochs": result.epochs, "final_loss": result.last.get("loss"),
            "images_per_second": round(result.images_per_second, 1)}

"""DBD stage 2: the classifier head on a frozen SimCLR backbone, symmetric CE.

Reference: 10 epochs, batch 128, Adam lr 0.002, SCE alpha 0.1 beta 1, features under
no_grad. The reference leaves the whole model in train mode, so backbone BatchNorm
running statistics still move (``linear.backbone_bn: train``, the default);
``frozen`` keeps the backbone in eval mode, a truly frozen backbone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.losses.sce import symmetric_cross_entropy
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.settings import WeakViewConfig, check
from engine.stages.classifier import ClassifierStage
from engine.stages.weights import load_weights
from engine.stages.base import INPUTS


@dataclass
class LinearConfig:
    epochs: int = 10
    iterations_per_epoch: int = 0
    batch_size: int = 128
    lr: float = 0.002  # Adam
    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    # "train": the reference leaves the model in train mode, so backbone BatchNorm
    # running statistics keep moving; "frozen": a truly frozen backbone (eval mode).
    backbone_bn: str = "train"
    view: WeakViewConfig = field(default_factory=WeakViewConfig)

    def validate(self) -> None:
        check(self.epochs >= 1, "linear.epochs", "must be >= 1")
        self.view.validate("linear.view")
        check(self.backbone_bn in ("train", "frozen"), "linear.backbone_bn", "must be train or frozen")


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


OPTIMIZER = "optimizer.pt"  # the head's Adam state, which fine-tuning continues


def adam_state_by_name(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's per-parameter state keyed by parameter name (CPU tensors)."""
    out = {}
    for name, p in module.named_parameters():
        state = optimizer.state.get(p)
        if state:
            out[name] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in state.items()}
    return out


class Linear(ClassifierStage):
    name = "linear"
    config_class = LinearConfig
    label = "DBD, linear stage"
    defense = "dbd"
    # What the result depends on besides this section and ``needs`` (engine.stages.keys).
    depends_on = INPUTS
    needs = ("pretrain",)
    default_position = 2

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["linear.batch_size=16"]

    def build(self) -> None:
        c, env = self.config, self.env
        batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, "linear.batch_size")
        classifier = Classifier(env.model.arch, env.model.width, env.num_classes)
        load_weights(classifier, env.upstream_model("pretrain"), prefix="backbone.")
        model = LinearProbe(classifier, c.backbone_bn)
        lr = batching.scale_lr(c.lr)
        self.backend = build_backend(model, lambda p: torch.optim.Adam([q for q in p if q.requires_grad], lr=lr),
                                     env.distributed, env.precision, env.dist, sync_bn=False,
                                     per_rank_batch=batching.per_rank)
        self.train_on_whole_set(batching, c.view, c.iterations_per_epoch)

    def loss(self, logits, labels):
        return symmetric_cross_entropy(logits, labels, self.config.sce_alpha, self.config.sce_beta)

    def save_outputs(self, stage_dir) -> None:
        # The reference keeps one Adam from this warm-up into MixMatch: fine-tuning
        # continues these moments (engine/defenses/dbd/finetune.py, finetune.adam_from_linear).
        from engine.fsutil import torch_save

        torch_save(stage_dir / OPTIMIZER, adam_state_by_name(self.backend.module, self.backend.optimizer))

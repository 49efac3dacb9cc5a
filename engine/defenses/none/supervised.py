"""The no-defense baseline: plain supervised training on the poisoned set.

Reference: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128, step decay x0.1 at
epochs 100 and 150 of 200, cross-entropy, RandomCrop(32, 4) + flip. ``schedule: cosine``
is BackdoorBench's baseline instead (CosineAnnealingLR over the epochs, stepped per
epoch; configs/cifar10/backdoorbench/).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.models import Classifier
from engine.rundir import NO_DEFENSE
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.settings import WeakViewConfig, check
from engine.stages.classifier import ClassifierStage
from engine.stages.base import INPUTS


@dataclass
class SupervisedConfig:
    """The no-defense baseline."""

    epochs: int = 200
    iterations_per_epoch: int = 0
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"  # step (x gamma at each milestone) | cosine (to 0 over the epochs)
    milestones: tuple[int, ...] = (100, 150)
    gamma: float = 0.1
    view: WeakViewConfig = field(default_factory=WeakViewConfig)

    def validate(self) -> None:
        check(self.epochs >= 1, "supervised.epochs", "must be >= 1")
        check(self.schedule in ("step", "cosine"), "supervised.schedule", "must be step or cosine")
        self.view.validate("supervised.view")


def lr_at(epoch: int, base: float, milestones, gamma: float) -> float:
    return base * gamma ** sum(epoch >= m for m in milestones)


class Supervised(ClassifierStage):
    name = "supervised"
    config_class = SupervisedConfig
    label = "no defense"
    defense = NO_DEFENSE
    # What the result depends on besides this section and ``needs`` (engine.stages.keys).
    depends_on = INPUTS
    default_position = 0

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["supervised.batch_size=16"]

    def build(self) -> None:
        c, env = self.config, self.env
        batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, "supervised.batch_size")
        self.base_lr = batching.scale_lr(c.lr)
        model = Classifier(env.model.arch, env.model.width, env.num_classes)
        self.backend = build_backend(
            model, lambda p: torch.optim.SGD(p, lr=self.base_lr, momentum=c.momentum, weight_decay=c.weight_decay),
            env.distributed, env.precision, env.dist, sync_bn=False, per_rank_batch=batching.per_rank)
        self.train_on_whole_set(batching, c.view, c.iterations_per_epoch)

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels)

    def on_epoch_start(self, epoch: int) -> None:
        c = self.config
        if c.schedule == "cosine":  # torch's CosineAnnealingLR(T_max=epochs, eta_min=0), per epoch
            self.backend.set_lr(self.base_lr * (1 + math.cos(math.pi * epoch / c.epochs)) / 2)
        else:
            self.backend.set_lr(lr_at(epoch, self.base_lr, c.milestones, c.gamma))

    def feature_backbone(self):
        return self.backend.module.backbone

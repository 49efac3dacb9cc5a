"""An ablation of DBD's third stage: fine-tune on the labelled part of the split only.

Each epoch splits the training set exactly as ``finetune`` does (the current model's
SCE loss, the lowest ``epsilon`` fraction keeps its label) and then trains the whole
model with plain cross-entropy on that labelled part, dropping the rest instead of
using it as MixMatch's unlabelled data. Comparing it with ``finetune`` measures what
the semi-supervised half of DBD's stage 3 adds. Not part of the reference.

This module is the worked example of engine/stages/README.md: a new stage is one file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.settings import WeakViewConfig, check
from engine.stages.classifier import ClassifierStage
from engine.defenses.dbd.split import EpochSplit
from engine.stages.views import WeakAugment
from engine.stages.weights import load_weights
from engine.stages.base import INPUTS


@dataclass
class FinetuneLabelledConfig:
    """Defaults follow ``finetune`` where the two share a setting."""

    epochs: int = 190
    batch_size: int = 64
    lr: float = 0.002  # Adam over the whole model, no schedule
    epsilon: float = 0.5
    sce_alpha: float = 0.1  # split loss
    sce_beta: float = 1.0
    view: WeakViewConfig = field(default_factory=WeakViewConfig)

    def validate(self) -> None:
        check(self.epochs >= 1, "finetune_labelled.epochs", "must be >= 1")
        self.view.validate("finetune_labelled.view")
        check(0.0 < self.epsilon < 1.0, "finetune_labelled.epsilon", f"must be in (0, 1), got {self.epsilon}")


class FinetuneLabelled(ClassifierStage):
    name = "finetune_labelled"
    config_class = FinetuneLabelledConfig
    label = "DBD ablation: labelled split only"
    defense = "dbd_labelled_only"
    # What the result depends on besides this section and ``needs`` (engine.stages.keys).
    depends_on = INPUTS
    needs = ("linear",)

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["finetune_labelled.batch_size=8"]

    def build(self) -> None:
        c, env = self.config, self.env
        batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, f"{self.name}.batch_size")
        model = Classifier(env.model.arch, env.model.width, env.num_classes)
        load_weights(model, env.upstream_model("linear"))
        lr = batching.scale_lr(c.lr)
        self.backend = build_backend(model, lambda p: torch.optim.Adam(p, lr=lr), env.distributed, env.precision,
                                     env.dist, sync_bn=False, per_rank_batch=batching.per_rank)
        self.augment = WeakAugment(env.data.config, c.view)
        self.split = EpochSplit(env.data, env.precision, self.augment, epsilon=c.epsilon, alpha=c.sce_alpha,
                                beta=c.sce_beta, metrics=env.metrics, name=self.name)
        self.per_rank = batching.per_rank
        self.loader = None
        # The labelled part always holds int(epsilon * N) samples: one pass over it.
        self.steps_per_epoch = int(c.epsilon * env.data.meta.train_count) // batching.global_batch
        if self.steps_per_epoch < 1:
            raise UserError(f"{self.name}: the labelled part ({int(c.epsilon * env.data.meta.train_count)} samples) "
                            f"makes no global batch of {batching.global_batch}; lower {self.name}.batch_size")
        self.epochs = c.epochs
        self.images_per_step = batching.global_batch

    def on_epoch_start(self, epoch: int) -> None:
        labelled = self.split.at(epoch, self.backend.module)
        if self.loader is None:
            self.loader = self.env.data.train_loader(self.per_rank, indices=labelled, stream=self.name)
        else:
            self.env.data.set_subset(self.loader, labelled)

    def loss(self, logits, labels):
        return F.cross_entropy(logits, labels)

    def state_dict(self) -> dict:
        return self.split.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.split.load_state_dict(state)

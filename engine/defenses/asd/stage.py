"""ASD as one stage: MixMatch from scratch, the clean pool re-drawn before every epoch.

Before epoch e the current model (eval mode) records each training sample's SCE loss
(alpha 0.1, beta 1) on a training view, with DBD's distributed per-sample pass. The
clean pool, trained on with its given labels, is then:

- e < ``class_aware_until`` (60): the clean seeds plus, per given label, the
  ``per_class_at(e)`` lowest losses (10 more per class every 5 epochs): 100, 200, ...,
  1,200 on CIFAR-10;
- e < ``meta_from`` (90): the lowest ``epsilon`` (half) of the set, one global ranking;
- afterwards, the meta-split (meta.py): the half whose loss falls least when a copy of
  the model takes one epoch of Adam on layer3, layer4 and the head.

Everything else is MixMatch's unlabelled part, and the step is DBD's MixMatch step
(``engine.defenses.dbd.finetune.Finetune``: K views, sharpening, mixup, interleaved
BatchNorm batches, Lx + lambda_u * ramp * Lu), here with a fresh Adam at 0.002 and the
ramp over the stage's own 120 epochs. The pool of the epoch in progress is part of the
checkpoint, so a mid-epoch resume trains on the pool it was drawing from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.defenses.asd.meta import BN_MODES, stepped, virtual_update
from engine.defenses.asd.pools import class_aware_pool, lowest_share, oracle_seeds, per_class_at, trusted_seeds
from engine.defenses.dbd.finetune import EMA, Finetune
from engine.defenses.dbd.split import Split, per_sample_losses, split_loader
from engine.errors import UserError
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.runtime.seeds import numpy_stream
from engine.settings import WeakViewConfig, check
from engine.stages.base import INPUTS
from engine.stages.views import WeakAugment, eval_view

ORACLE = "oracle"
RULES = ("class_aware", "agnostic", "meta")


@dataclass
class ASDConfig:
    """KuofengGao/ASD at 8bcb10b (config/baseline_asd.yaml), CIFAR-10."""

    epochs: int = 120
    iterations_per_epoch: int = 1024
    batch_size: int = 64  # labelled per step; the same number of unlabelled
    lr: float = 0.002  # Adam over the whole model, no weight decay, no schedule
    k_views: int = 2
    temperature: float = 0.5
    mixup_alpha: float = 0.75
    lambda_u: float = 15.0
    rampup_epochs: int = 120  # the ramp runs over all of ASD's epochs
    ema_decay: float = 0.0  # 0 = off (the reference's EMA is commented out)
    sce_alpha: float = 0.1  # the record's loss
    sce_beta: float = 1.0
    # oracle: drawn from the ground truth, as the reference does (a real defender has no
    # such list); or the path of a file of trusted training indices.
    seeds: str = ORACLE
    seeds_per_class: int = 10
    growth: int = 10  # per class, every growth_every epochs
    growth_every: int = 5
    class_aware_until: int = 60
    meta_from: int = 90
    epsilon: float = 0.5
    meta_lr: float = 0.015  # Adam of the virtual model
    meta_epochs: int = 1
    meta_batch_size: int = 128
    meta_params: tuple[str, ...] = ("backbone.layer3", "backbone.layer4", "classifier")
    # train: the copy trains in train mode, every BatchNorm's statistics move (reference);
    # frozen_below: the layers not stepped keep theirs.
    meta_bn: str = "train"
    # train: records on random training views, a fresh draw for the meta-split's second
    # record (reference); clean: the evaluation view, the same image every record.
    record_view: str = "train"
    view: WeakViewConfig = field(default_factory=WeakViewConfig)  # reflect pad-crop 4 + flip, as the reference

    def validate(self) -> None:
        check(self.epochs >= 1 and self.iterations_per_epoch >= 1, "asd.epochs", "epochs and iterations must be >= 1")
        check(self.k_views >= 1, "asd.k_views", "must be >= 1")
        check(self.rampup_epochs >= 1, "asd.rampup_epochs", "must be >= 1")
        check(0.0 <= self.ema_decay < 1.0, "asd.ema_decay", "must be in [0, 1)")
        check(self.seeds_per_class >= 1 and self.growth >= 0 and self.growth_every >= 1, "asd.growth",
              "seeds_per_class and growth_every must be >= 1, growth >= 0")
        check(0 <= self.class_aware_until <= self.meta_from, "asd.meta_from",
              f"must be >= asd.class_aware_until ({self.class_aware_until})")
        check(0.0 < self.epsilon < 1.0, "asd.epsilon", f"must be in (0, 1), got {self.epsilon}")
        check(self.meta_epochs >= 1 and self.meta_batch_size >= 1 and self.meta_lr > 0, "asd.meta_epochs",
              "meta_epochs and meta_batch_size must be >= 1, meta_lr > 0")
        check(self.meta_bn in BN_MODES, "asd.meta_bn", f"must be one of {', '.join(BN_MODES)}")
        check(self.record_view in ("train", "clean"), "asd.record_view", "must be train or clean")
        self.view.validate("asd.view")


class ASD(Finetune):
    """DBD's MixMatch stage with ASD's pools: ``prepare``, ``update`` and ``batches`` are
    Finetune's own; the model, the optimizer and the pool at each epoch's start differ."""

    name = "asd"
    config_class = ASDConfig
    label = "ASD"
    defense = "asd"
    # What the result depends on besides this section (engine.stages.keys).
    depends_on = INPUTS
    needs = ()
    default_position = None

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        # lr 0.02: two Adam steps then move every weight of DeepSpeed's bf16 copy (its spacing
        # at 1.0 is 0.0078; two steps of the default 0.002 may cancel below it).
        return ["asd.batch_size=8", "asd.iterations_per_epoch=4", "asd.seeds_per_class=2", "asd.meta_batch_size=16",
                "asd.lr=0.02"]

    def build(self) -> None:
        c, env = self.config, self.env
        data = env.data
        batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, "asd.batch_size")
        self.per_rank, self.global_batch = batching.per_rank, batching.global_batch
        model = Classifier(env.model.arch, env.model.width, env.num_classes)
        stepped(model, c.meta_params)  # a model without those parts fails here, not at epoch 90
        lr = batching.scale_lr(c.lr)
        self.backend = build_backend(model, lambda p: torch.optim.Adam(p, lr=lr), env.distributed, env.precision,
                                     env.dist, sync_bn=False, per_rank_batch=batching.per_rank)
        self.augment = WeakAugment(data.config, c.view)
        self.ema = EMA(self.backend.module, c.ema_decay) if c.ema_decay > 0 else None
        self.ramp_offset = 0
        self.labels, self.poisoned = data.train_labels(), data.poisoned_mask()
        if c.seeds == ORACLE:
            self.seeds = oracle_seeds(self.poisoned, self.labels, c.seeds_per_class, env.num_classes,
                                      numpy_stream(env.seed, "asd_seeds"))
            self.label = "ASD (oracle clean seeds)"
        else:
            self.seeds = trusted_seeds(c.seeds, len(self.labels))
            self.label = "ASD (trusted seeds)"
        self.meta_batching = plan_batch(c.meta_batch_size, env.distributed, env.dist.world_size, "asd.meta_batch_size")
        self.record_loader = self.meta_loader = None  # built at first use
        self.labelled_loader = self.unlabelled_loader = None
        self.pool_epoch, self.labelled = -1, None
        self.epochs = c.epochs
        self.steps_per_epoch = c.iterations_per_epoch
        self.images_per_step = batching.global_batch * 2

    # ---- the pool, at every epoch's start
    def rule(self, epoch: int) -> str:
        c = self.config
        return RULES[0] if epoch < c.class_aware_until else RULES[1] if epoch < c.meta_from else RULES[2]

    def on_epoch_start(self, epoch: int) -> None:
        if self.pool_epoch != epoch:  # a mid-epoch resume restored this epoch's pool instead
            self.labelled = self.draw_pool(epoch, self.backend.module)
            self.pool_epoch = epoch
        labelled = self.labelled
        unlabelled = np.setdiff1d(np.arange(len(self.labels)), labelled)
        for part_name, part in (("clean pool", labelled), ("polluted pool", unlabelled)):
            if len(part) < self.global_batch:
                raise UserError(f"asd: the {part_name} holds {len(part)} samples at epoch {epoch}, fewer than one "
                                f"global batch ({self.global_batch}); lower asd.batch_size")
        self.point_loaders(labelled, unlabelled, stream="asd")

    def draw_pool(self, epoch: int, module: torch.nn.Module) -> np.ndarray:
        """The clean pool for ``epoch`` from ``module``'s record; logs its quality."""
        c = self.config
        rule = self.rule(epoch)
        losses = self.record(module, epoch, "split_view")
        if rule == "class_aware":
            pool = class_aware_pool(losses, self.labels, self.seeds, per_class_at(epoch, c.growth, c.growth_every),
                                    self.env.num_classes)
        elif rule == "agnostic":
            pool = lowest_share(losses, c.epsilon)
        else:
            virtual = virtual_update(module, self.meta_batches(epoch), self.env.dist, self.env.precision,
                                     prefixes=c.meta_params, lr=c.meta_lr, bn=c.meta_bn)
            # The reference's second record draws fresh random views (a purpose of its own).
            pool = lowest_share(losses - self.record(virtual, epoch, "asd_meta_record_view"), c.epsilon)
        quality = Split(pool, np.setdiff1d(np.arange(len(losses)), pool), losses).quality(self.poisoned)
        env = self.env
        if env.dist.is_main:
            env.metrics.log("asd_pool", epoch=epoch, rule=rule, **quality)
            print(f"[{self.name}] epoch {epoch} ({rule}): clean pool {quality['labelled']}, poisoned share "
                  f"{quality['labelled_poison_share']:.2f}%", flush=True)
        return pool

    def record(self, module: torch.nn.Module, epoch: int, purpose: str) -> np.ndarray:
        """Every training sample's SCE under ``module`` in eval mode (DBD's distributed pass)."""
        c, data = self.config, self.env.data
        if self.record_loader is None:
            self.record_loader = split_loader(data)
        if c.record_view == "train":
            def view(images, **kw):
                return self.augment(images, **{**kw, "purpose": purpose})
        else:
            def view(images, **_):
                return eval_view(data.config, images)
        return per_sample_losses(data, self.env.precision, module, view, epoch, self.labels, c.sce_alpha, c.sce_beta,
                                 loader=self.record_loader)

    def meta_batches(self, epoch: int):
        """The virtual model's epochs: every training sample, shuffled, on the training view."""
        env, c = self.env, self.config
        data = env.data
        if self.meta_loader is None:
            self.meta_loader = data.train_loader(self.meta_batching.per_rank, stream="asd_meta")
        dev = env.dist.device
        for k in range(c.meta_epochs):
            for step, (images, labels, _) in enumerate(data.epoch(self.meta_loader, epoch * c.meta_epochs + k)):
                x = self.augment(images.to(dev, non_blocking=True), seed=env.seed, epoch=epoch, step=step,
                                 rank=env.dist.rank, purpose=f"asd_meta_view_{k}")
                yield x, labels.to(dev, non_blocking=True)

    # ---- checkpoints
    def state_dict(self) -> dict:
        out = {"pool_epoch": self.pool_epoch,
               "labelled": None if self.labelled is None else torch.from_numpy(self.labelled)}
        if self.ema is not None:
            out["ema"] = self.ema.module.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.pool_epoch = int(state.get("pool_epoch", -1))
        labelled = state.get("labelled")
        self.labelled = None if labelled is None else labelled.numpy()
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])

    def summary(self) -> dict:
        return {"clean_seeds": self.config.seeds, "seed_count": int(len(self.seeds))}

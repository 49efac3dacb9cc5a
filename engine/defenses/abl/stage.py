"""ABL as one stage: isolation, the isolated set, fine-tuning, unlearning by ascent.

Epochs [0, I) train a fresh model on every training sample under the floored batch loss
(loss.py), in the reference's order (index order for bboylyg/ABL, shuffled for
BackdoorBench), without augmentation. At epoch I the model (eval mode) scores every
training sample with plain CE on the unaugmented image and its given label; the
``int(N * isolation_ratio)`` lowest form the isolated set (a global ranking, ties to the
lower index). Epochs [I, I + F) fine-tune the same model with CE on the other samples
(weak view, Cutout for bboylyg/ABL); epochs [I + F, I + F + U) step on -CE over the
isolated samples. The SGD starts fresh at epoch I, as the reference's second script
creates a new one, and carries its momentum from fine-tuning into unlearning.

``abl.preset`` picks the settings the two references differ in; any of them set
explicitly wins over the preset. The isolated set and the optimizer's fresh start are
part of the checkpoint, so a resume never re-scores with a partly trained model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from engine.defenses.abl.batches import epoch_order, global_steps, rank_pieces, recut
from engine.defenses.abl.cutout import cutout
from engine.defenses.abl.loss import KINDS, floor_sign, floored_loss
from engine.defenses.dbd.split import per_sample_losses
from engine.errors import UserError
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.runtime.seeds import seed_stream, stream_seed
from engine.settings import WeakViewConfig, check
from engine.stages.base import INPUTS, Stage
from engine.stages.views import WeakAugment, eval_view

# The settings the two references differ in (shared/reference/defenses.md, "Settings").
PRESETS: dict[str, dict] = {
    # bboylyg/ABL at 3fd736c: config.py, backdoor_isolation.py, backdoor_unlearning.py.
    "bboylyg": dict(isolation_epochs=10, isolation_lr=0.1, isolation_shuffle=False, batch_size=128,
                    finetune_lr=0.1, cutout=True, unlearning_epochs=4, unlearning_lr=5e-4, unlearning_augment=False),
    # BackdoorBench at f02e353: defense/abl.py and config/defense/abl/cifar10.yaml.
    "backdoorbench": dict(isolation_epochs=20, isolation_lr=0.01, isolation_shuffle=True, batch_size=256,
                          finetune_lr=0.01, cutout=False, unlearning_epochs=20, unlearning_lr=1e-4,
                          unlearning_augment=True),
}
PHASES = ("isolation", "finetune", "unlearning")
ISOLATED = "isolated.pt"  # the isolated training indices, beside model.pt


def _constant_pad_crop() -> WeakViewConfig:
    # torchvision's RandomCrop(32, padding=4) pads with zeros in both references.
    return WeakViewConfig(padding_mode="constant")


@dataclass
class ABLConfig:
    """None: the preset's value (``PRESETS``)."""

    preset: str = "bboylyg"  # bboylyg | backdoorbench
    batch_size: int | None = None
    momentum: float = 0.9  # SGD with Nesterov momentum in every phase, as both references
    weight_decay: float = 1e-4
    nesterov: bool = True
    # Isolation: the whole poisoned set, no augmentation, the floored batch-mean CE.
    isolation_epochs: int | None = None
    isolation_lr: float | None = None  # constant
    isolation_shuffle: bool | None = None  # bboylyg/ABL reads the set in index order
    loss: str = "flooding"  # flooding | lga (the same gradient; only the logged value differs)
    flooding: float = 0.5
    gamma: float = 0.5
    isolation_ratio: float = 0.01
    # Fine-tuning on the samples not isolated: CE, weak view (+ Cutout), step decay.
    finetune_epochs: int = 60
    finetune_lr: float | None = None
    finetune_milestones: tuple[int, ...] = (40,)  # epochs counted from the fine-tuning's first
    finetune_gamma: float = 0.1
    cutout: bool | None = None
    cutout_length: int = 3
    view: WeakViewConfig = field(default_factory=_constant_pad_crop)
    # Unlearning: gradient ascent (-CE) on the isolated samples.
    unlearning_epochs: int | None = None  # bboylyg/ABL's 5 epochs, of which the first only evaluates
    unlearning_lr: float | None = None  # constant
    unlearning_augment: bool | None = None  # the weak view (BackdoorBench) or none (bboylyg/ABL)

    def validate(self) -> None:
        check(self.preset in PRESETS, "abl.preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:  # resolved here, at load time: stage keys see the values
                setattr(self, key, value)
        check(self.batch_size >= 1, "abl.batch_size", "must be >= 1")
        check(self.isolation_epochs >= 1, "abl.isolation_epochs", "must be >= 1")
        check(self.finetune_epochs >= 0 and self.unlearning_epochs >= 0, "abl.finetune_epochs",
              "fine-tuning and unlearning epochs must be >= 0")
        # The isolated set is drawn when isolation ends: at least one epoch must follow it.
        check(self.finetune_epochs + self.unlearning_epochs >= 1, "abl.unlearning_epochs",
              "fine-tuning and unlearning epochs must add up to at least 1")
        check(self.loss in KINDS, "abl.loss", f"must be one of {', '.join(KINDS)}, got {self.loss!r}")
        check(0.0 < self.isolation_ratio < 1.0, "abl.isolation_ratio", f"must be in (0, 1), got {self.isolation_ratio}")
        check(self.cutout_length >= 1, "abl.cutout_length", "must be >= 1")
        check(min(self.isolation_lr, self.finetune_lr, self.unlearning_lr) > 0, "abl.isolation_lr",
              "learning rates must be > 0")
        self.view.validate("abl.view")


class ABL(Stage):
    name = "abl"
    config_class = ABLConfig
    label = "ABL"
    defense = "abl"
    # What the result depends on besides this section (engine.stages.keys).
    depends_on = INPUTS

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["abl.batch_size=16", "abl.isolation_ratio=0.25"]

    def build(self) -> None:
        c, env = self.config, self.env
        self.batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, "abl.batch_size")
        model = Classifier(env.model.arch, env.model.width, env.num_classes)
        self.backend = build_backend(
            model, lambda p: torch.optim.SGD(p, lr=self.lr_at(0), momentum=c.momentum,
                                             weight_decay=c.weight_decay, nesterov=c.nesterov),
            env.distributed, env.precision, env.dist, sync_bn=False, per_rank_batch=self.batching.per_rank)
        self.weak = WeakAugment(env.data.config, c.view)
        n, world = env.data.meta.train_count, env.dist.world_size
        self.n_isolated = int(n * c.isolation_ratio)
        if self.n_isolated < world:
            raise UserError(f"abl: isolating {c.isolation_ratio} of {n} samples leaves {self.n_isolated}, fewer than "
                            f"one per process ({world}); raise abl.isolation_ratio")
        # One in-order reader; each epoch points it at this rank's pieces (a swap, not a rebuild).
        self.loader = env.data.scoring_loader(np.arange(n))
        self.poisoned = env.data.poisoned_mask()
        self.isolated: np.ndarray | None = None
        self.fresh_optimizer = False  # the SGD's state was emptied at the fine-tuning's start
        self.epochs = c.isolation_epochs + c.finetune_epochs + c.unlearning_epochs
        # The longest phase's epoch (isolation reads every sample); the others end sooner.
        self.steps_per_epoch = global_steps(n, self.batching.global_batch, world)
        self.images_per_step = self.batching.global_batch

    # ---- the schedule
    def phase(self, epoch: int) -> str:
        c = self.config
        if epoch < c.isolation_epochs:
            return "isolation"
        return "finetune" if epoch < c.isolation_epochs + c.finetune_epochs else "unlearning"

    def lr_at(self, epoch: int) -> float:
        c = self.config
        phase = self.phase(epoch)
        if phase == "isolation":
            lr = c.isolation_lr
        elif phase == "finetune":
            since = epoch - c.isolation_epochs
            lr = c.finetune_lr * c.finetune_gamma ** sum(since >= m for m in c.finetune_milestones)
        else:
            lr = c.unlearning_lr
        return self.batching.scale_lr(lr)

    def on_epoch_start(self, epoch: int) -> None:
        if self.phase(epoch) != "isolation":
            if self.isolated is None:
                self.isolate(epoch)
            if not self.fresh_optimizer:
                _empty_optimizer_state(self.backend)
                self.fresh_optimizer = True
        self.backend.set_lr(self.lr_at(epoch))

    # ---- the isolated set
    def isolate(self, epoch: int) -> np.ndarray:
        """Score every training sample (CE, eval mode, no augmentation, the given label) and
        keep the lowest ``n_isolated``; logs the set's quality as a poison detector."""
        env = self.env
        data = env.data
        # DBD's distributed per-sample pass: SCE with alpha 1 and beta 0 is exactly CE, and
        # the "augmentation" here is the evaluation view (normalisation only).
        losses = per_sample_losses(data, env.precision, self.backend.module, lambda images, **_: eval_view(
            data.config, images), epoch, data.train_labels(), alpha=1.0, beta=0.0)
        self.isolated = lowest(losses, self.n_isolated)
        quality = isolation_quality(self.isolated, self.poisoned)
        if env.dist.is_main:
            env.metrics.log("isolation", epoch=epoch, **quality)
            print(f"[{self.name}] isolated {quality['isolated']} samples: {quality['poisoned_isolated']} poisoned "
                  f"(precision {quality['precision']:.1f}%, recall {quality['recall']:.1f}%)", flush=True)
        return self.isolated

    def others(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.poisoned)), self.isolated)

    # ---- batches and one step
    def batches(self, epoch: int):
        env, c = self.env, self.config
        phase = self.phase(epoch)
        if phase == "isolation":
            pool, shuffle = np.arange(len(self.poisoned)), c.isolation_shuffle
        else:
            pool, shuffle = (self.others() if phase == "finetune" else self.isolated), True
        order = epoch_order(pool, shuffle=shuffle, seed=stream_seed(env.seed, f"order/abl_{phase}"), epoch=epoch)
        indices, sizes = rank_pieces(order, self.batching.global_batch, env.dist.rank, env.dist.world_size)
        if not sizes:
            return
        env.data.set_subset(self.loader, indices)
        yield from recut(env.data.epoch(self.loader, epoch), sizes)

    def prepare(self, batch, epoch: int, step: int):
        images, labels, _ = batch
        env, c = self.env, self.config
        dev = env.dist.device
        images = images.to(dev, non_blocking=True)
        phase = self.phase(epoch)
        if phase == "finetune" or (phase == "unlearning" and c.unlearning_augment):
            kw = dict(seed=env.seed, epoch=epoch, step=step, rank=env.dist.rank)
            x = self.weak(images, purpose=f"abl_{phase}_view", **kw)
            if phase == "finetune" and c.cutout:
                data = env.data.config
                x = cutout(x, c.cutout_length, data.mean, data.std, seed_stream(purpose="abl_cutout", device=dev, **kw))
        else:
            x = eval_view(env.data.config, images)
        return x, labels.to(dev, non_blocking=True)

    def update(self, inputs, epoch: int, step: int) -> dict:
        x, y = inputs
        c, backend = self.config, self.backend
        logits = backend.forward(x).float()
        local, mean = self._global_mean(F.cross_entropy(logits, y, reduction="none"))
        phase = self.phase(epoch)
        if phase == "isolation":
            # The floor acts on the global batch's mean, as the reference's on its one batch.
            objective = floor_sign(mean, c.loss, flooding=c.flooding, gamma=c.gamma) * local
            shown = floored_loss(mean, c.loss, flooding=c.flooding, gamma=c.gamma)
        else:
            objective = local if phase == "finetune" else -local
            shown = objective.detach()
        backend.zero_grad()
        backend.backward(objective)
        backend.step()
        return {"loss": mean, "objective": shown, "acc": (logits.argmax(1) == y).float().mean()}

    def _global_mean(self, per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's share of the global batch's mean CE, whose rank average is that mean
        with gradient; the mean itself, detached). Ranks may hold pieces of unequal size
        (a partial last batch), so each is weighted by its size, not averaged."""
        world = self.env.dist.world_size
        if world == 1:
            mean = per_sample.mean()
            return mean, mean.detach()
        sums = torch.stack([per_sample.detach().sum(), per_sample.new_tensor(float(len(per_sample)))])
        total, count = self.env.dist.all_reduce_sum(sums).unbind()
        return per_sample.sum() * (world / count), total / count

    # ---- checkpoints, outputs
    def state_dict(self) -> dict:
        return {"isolated": None if self.isolated is None else torch.from_numpy(self.isolated),
                "fresh_optimizer": self.fresh_optimizer}

    def load_state_dict(self, state: dict) -> None:
        isolated = state.get("isolated")
        self.isolated = None if isolated is None else isolated.numpy()
        self.fresh_optimizer = bool(state.get("fresh_optimizer", False))

    def feature_backbone(self):
        return self.backend.module.backbone

    def summary(self) -> dict:
        return {"isolation": isolation_quality(self.isolated, self.poisoned)} if self.isolated is not None else {}

    def save_outputs(self, stage_dir) -> None:
        # The reference loses this file (its two scripts spell its name differently).
        from engine.fsutil import torch_save

        if self.isolated is not None:
            torch_save(stage_dir / ISOLATED, {"isolated": torch.from_numpy(self.isolated)})


def lowest(losses: np.ndarray, count: int) -> np.ndarray:
    """The indices of the ``count`` lowest losses, sorted; ties go to the lower index."""
    order = np.lexsort((np.arange(len(losses)), losses))
    return np.sort(order[:count])


def isolation_quality(isolated: np.ndarray, poisoned: np.ndarray) -> dict:
    """The isolated set as a poison detector: precision is the share of it that is poisoned."""
    hit, total = int(poisoned[isolated].sum()), int(poisoned.sum())
    return {"isolated": int(len(isolated)), "poisoned_isolated": hit,
            "precision": 100.0 * hit / len(isolated) if len(isolated) else 0.0,
            "recall": 100.0 * hit / total if total else 0.0}


def _empty_optimizer_state(backend) -> None:
    """A fresh SGD, as the reference's unlearning script makes: torch's SGD creates its
    momentum buffers on first use, so emptying its state is exactly a new one (the
    learning rate is set per epoch). DeepSpeed's ZeRO wrappers hold a torch optimizer too."""
    wrapped = getattr(getattr(backend, "ds_optimizer", None), "optimizer", None)
    for optimizer in (backend.optimizer, wrapped):
        if isinstance(optimizer, torch.optim.Optimizer):
            optimizer.state.clear()

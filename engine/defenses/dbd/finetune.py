"""DBD stage 3: split by loss at every epoch, then MixMatch over the whole model.

At the start of each epoch the current model (eval mode) scores every training sample
with symmetric CE under training augmentation; the lowest ``epsilon`` fraction keeps
its (possibly poisoned) label, the rest become unlabelled (engine.defenses.dbd.split). Then
``iterations_per_epoch`` MixMatch steps: K weak views per unlabelled image, guessed
labels sharpened with T, mixup over labelled + unlabelled with lambda = max(l, 1 - l),
interleaved forwards so every BatchNorm batch mixes both parts, Lx + lambda_u * ramp * Lu
with the ramp indexed by the global epoch (linear-stage epochs included, as the
reference). Adam over the whole model, no schedule; an EMA of the weights is optional.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.errors import UserError
from engine.losses.mixmatch import interleave, linear_rampup, mixmatch_loss, mixup, sharpen
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.runtime.seeds import seed_stream
from engine.settings import WeakViewConfig, check
from engine.stages.base import INPUTS, Stage
from engine.defenses.dbd.linear import OPTIMIZER
from engine.defenses.dbd.split import EpochSplit
from engine.stages.views import WeakAugment
from engine.stages.weights import load_weights


@dataclass
class FinetuneConfig:
    """MixMatch on the split. The split fraction is ``epsilon``."""

    epochs: int = 190
    iterations_per_epoch: int = 1024
    batch_size: int = 64  # labelled per step; the same number of unlabelled
    lr: float = 0.002  # Adam over the whole model, no schedule
    epsilon: float = 0.5
    k_views: int = 2
    temperature: float = 0.5  # sharpening
    mixup_alpha: float = 0.75
    lambda_u: float = 15.0
    rampup_epochs: int = 190
    # The ramp is indexed by the global epoch, linear-stage epochs included (reference).
    ramp_includes_linear: bool = True
    ema_decay: float = 0.0  # 0 = off (reference); 0.999 is MixMatch's default
    # The reference keeps one Adam from the linear warm-up into MixMatch, so the head's
    # moments (and step counts) carry over; false starts a fresh Adam (a deviation).
    adam_from_linear: bool = True
    sce_alpha: float = 0.1  # split loss
    sce_beta: float = 1.0
    view: WeakViewConfig = field(default_factory=WeakViewConfig)

    def validate(self) -> None:
        check(0.0 < self.epsilon < 1.0, "finetune.epsilon", f"must be in (0, 1), got {self.epsilon}")
        self.view.validate("finetune.view")
        check(self.k_views >= 1, "finetune.k_views", "must be >= 1")
        check(self.epochs >= 1 and self.iterations_per_epoch >= 1, "finetune.epochs",
              "epochs and iterations must be >= 1")
        check(0.0 <= self.ema_decay < 1.0, "finetune.ema_decay", "must be in [0, 1)")
        check(self.rampup_epochs >= 1, "finetune.rampup_epochs", "must be >= 1")


class EMA:
    """Exponential moving average of parameters and buffers (MixMatch's evaluation model)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        # foreach ops: a few fused launches for the whole model instead of two per tensor.
        floats, ints = ([], []), ([], [])
        for e, m in zip(self.module.state_dict().values(), module.state_dict().values()):
            pair = floats if e.is_floating_point() else ints
            pair[0].append(e)
            pair[1].append(m.detach().to(e.dtype))
        if floats[0]:
            torch._foreach_lerp_(floats[0], floats[1], 1 - self.decay)
        if ints[0]:
            torch._foreach_copy_(ints[0], ints[1])


class Finetune(Stage):
    name = "finetune"
    config_class = FinetuneConfig
    label = "DBD"
    defense = "dbd"
    # What the result depends on besides this section and ``needs`` (engine.stages.keys).
    depends_on = INPUTS
    needs = ("linear",)
    default_position = 3

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["finetune.batch_size=8", "finetune.iterations_per_epoch=4"]

    def build(self) -> None:
        c, env = self.config, self.env
        batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, "finetune.batch_size")
        self.per_rank = batching.per_rank
        self.global_batch = batching.global_batch
        model = Classifier(env.model.arch, env.model.width, env.num_classes)
        load_weights(model, env.upstream_model(self.needs[0]))
        lr = batching.scale_lr(c.lr)
        self.backend = build_backend(model, lambda p: torch.optim.Adam(p, lr=lr), env.distributed, env.precision,
                                     env.dist, sync_bn=False, per_rank_batch=batching.per_rank)
        if c.adam_from_linear:
            self._continue_adam(env.run_dir / "linear" / OPTIMIZER)
        self.augment = WeakAugment(env.data.config, c.view)
        self.ema = EMA(self.backend.module, c.ema_decay) if c.ema_decay > 0 else None
        # The reference's ramp counts the linear stage's epochs (those it actually ran).
        self.ramp_offset = int(env.upstream_summary("linear")["epochs"]) if c.ramp_includes_linear else 0
        self.split = EpochSplit(env.data, env.precision, self.augment, epsilon=c.epsilon, alpha=c.sce_alpha,
                                beta=c.sce_beta, metrics=env.metrics, name=self.name)
        self.labelled_loader = self.unlabelled_loader = None
        self.epochs = c.epochs
        self.steps_per_epoch = c.iterations_per_epoch
        self.images_per_step = batching.global_batch * 2

    def _continue_adam(self, path) -> None:
        """Load the linear stage's Adam state into this Adam, parameter by parameter."""
        if not path.is_file():
            raise UserError(f"{self.name}: {path} is missing, so the linear stage's Adam cannot carry over (the "
                            f"reference keeps one Adam); rerun the linear stage, or set "
                            f"{self.name}.adam_from_linear=false to start a fresh Adam")
        optimizer = self.backend.optimizer
        if not isinstance(optimizer, torch.optim.Adam) or optimizer.state:
            raise RuntimeError(f"{self.name}: expected a fresh torch Adam to continue, got {type(optimizer).__name__}")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        params = dict(self.backend.module.named_parameters())
        unknown = sorted(set(saved) - set(params))
        if unknown:
            raise UserError(f"{path} holds Adam state for parameters this model lacks ({unknown[:3]})")
        optimized = {id(q) for group in optimizer.param_groups for q in group["params"]}
        for name, state in saved.items():
            p = params[name]
            if id(p) not in optimized:
                # ZeRO-1/2 and DeepSpeed's own bf16/fp16 modes optimise flattened copies.
                raise UserError(f"{self.name}: this backend optimises flattened copies of the parameters, so the "
                                f"linear stage's Adam state cannot be carried over; use a ZeRO-0 DeepSpeed config "
                                f"or set {self.name}.adam_from_linear=false")
            optimizer.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and k != "step" else v)
                                  for k, v in state.items()}

    # ---- the split, at every epoch start
    def on_epoch_start(self, epoch: int) -> None:
        labelled = self.split.at(epoch, self.backend.module)
        unlabelled = self.split.unlabelled()
        for part_name, part in (("labelled", labelled), ("unlabelled", unlabelled)):
            if len(part) < self.global_batch:
                raise UserError(f"{self.name}: the {part_name} part of the split has {len(part)} samples, fewer "
                                f"than one global batch ({self.global_batch}); lower {self.name}.batch_size or "
                                f"change {self.name}.epsilon ({self.config.epsilon})")
        self.point_loaders(labelled, unlabelled, stream="mixmatch")

    def point_loaders(self, labelled, unlabelled, stream: str) -> None:
        """MixMatch's two loaders on this epoch's parts: built at the first call (orders
        ``order/<stream>_labelled`` and ``_unlabelled``), then only their subsets swapped (a
        rebuild recompiles the loader)."""
        data = self.env.data
        if self.labelled_loader is None:
            self.labelled_loader = data.train_loader(self.per_rank, indices=labelled, stream=f"{stream}_labelled")
            self.unlabelled_loader = data.train_loader(self.per_rank, indices=unlabelled,
                                                       stream=f"{stream}_unlabelled")
        else:
            data.set_subset(self.labelled_loader, labelled)
            data.set_subset(self.unlabelled_loader, unlabelled)

    def batches(self, epoch: int):
        data = self.env.data
        xs, us = data.endless(self.labelled_loader, epoch), data.endless(self.unlabelled_loader, epoch)
        try:
            while True:
                yield next(xs), next(us)
        finally:
            xs.close()
            us.close()

    # ---- one MixMatch step
    def prepare(self, batch, epoch: int, step: int):
        """The labelled batch's view, K views of the unlabelled batch, the labels."""
        (x_img, x_lab, _), (u_img, _, _) = batch
        env = self.env
        dev = env.dist.device
        x_img, u_img = x_img.to(dev, non_blocking=True), u_img.to(dev, non_blocking=True)
        kw = dict(seed=env.seed, epoch=epoch, step=step, rank=env.dist.rank)
        xb = self.augment(x_img, purpose="mixmatch_labelled_view", **kw)
        ubs = [self.augment(u_img, purpose=f"mixmatch_unlabelled_view_{k}", **kw) for k in range(self.config.k_views)]
        return xb, ubs, x_lab.to(dev, non_blocking=True)

    def update(self, inputs, epoch: int, step: int) -> dict:
        xb, ubs, x_lab = inputs
        c, env, backend = self.config, self.env, self.backend
        B = self.per_rank
        with torch.no_grad():
            # Label guessing in train mode, as MixMatch and the DBD reference do.
            probs = [F.softmax(o.float(), dim=1) for o in backend.forward_each(ubs)]
            guess = sharpen(sum(probs) / len(probs), c.temperature)
        targets = torch.cat([F.one_hot(x_lab, env.num_classes).float()] + [guess] * c.k_views)
        inputs = torch.cat([xb] + ubs)
        gen = seed_stream(env.seed, "mixup", epoch, step, env.dist.rank, device=inputs.device)
        mixed_x, mixed_y, _ = mixup(inputs, targets, c.mixup_alpha, generator=gen)
        chunks = interleave(list(torch.split(mixed_x, B)), B)
        logits = interleave(backend.forward_each(chunks), B)
        lx, lu = mixmatch_loss(logits[0], mixed_y[:B], torch.cat(logits[1:]), mixed_y[B:])
        w = c.lambda_u * linear_rampup(self.ramp_offset + epoch + step / c.iterations_per_epoch, c.rampup_epochs)
        loss = lx + w * lu
        backend.zero_grad()
        backend.backward(loss)
        backend.step()
        if self.ema is not None:
            self.ema.update(backend.module)
        return {"loss": loss.detach(), "loss_x": lx.detach(), "loss_u": lu.detach(), "lambda_u": w}

    # ---- checkpoints and evaluation
    def state_dict(self) -> dict:
        out = self.split.state_dict()
        if self.ema is not None:
            out["ema"] = self.ema.module.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.split.load_state_dict(state)
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])

    def eval_module(self):
        return self.ema.module if self.ema is not None else self.backend.module

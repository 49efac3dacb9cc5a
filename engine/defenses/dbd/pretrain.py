"""Stage 1: SimCLR on every training image (triggers in, labels ignored).

Two views per image are cut on the device by ``kernels``; both go through the model
in one forward (BatchNorm sees the 2B batch, as in the reference), and the NT-Xent
loss is taken over the embeddings of all ranks. The cosine schedule spans
``schedule_epochs`` and is stepped per epoch (the reference's CosineAnnealingLR with
T_max 1000); training stops after ``epochs``.

The augmentation parameters of a step are drawn for the whole global batch from one
seed (seed, epoch, step) and each rank takes the rows of its own samples. The loader
gives rank r the samples r, r+W, r+2W, ... of the step's global batch, so every sample
gets the same view whatever the number of processes: a run on 2 processes follows the
same trajectory as a run on 1 with the same global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from engine.errors import UserError
from engine.losses.ntxent import nt_xent
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.settings import SimCLRViewConfig, check
from engine.stages.base import INPUTS, Stage
from engine.stages.views import simclr_spec


@dataclass
class PretrainConfig:
    """SimCLR. ``epochs`` is how far to train (the checkpoint used downstream);
    ``schedule_epochs`` is the cosine schedule's length (reference: 100 of 1000)."""

    epochs: int = 100
    schedule_epochs: int = 1000
    iterations_per_epoch: int = 0  # 0 = one pass over the training set
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd | lars
    lr: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 0.5
    loss: str = "reference"  # reference (one-directional) | symmetric (NT-Xent)
    sync_bn: bool = True
    views: SimCLRViewConfig = field(default_factory=SimCLRViewConfig)

    def validate(self) -> None:
        check(self.epochs >= 1, "pretrain.epochs", "must be >= 1")
        check(self.schedule_epochs >= self.epochs, "pretrain.schedule_epochs", "must be >= pretrain.epochs")
        check(self.optimizer in ("sgd", "lars"), "pretrain.optimizer", "must be sgd or lars")
        check(self.loss in ("reference", "symmetric"), "pretrain.loss", "must be reference or symmetric")
        check(self.temperature > 0, "pretrain.temperature", "must be > 0")
        check(self.batch_size >= 2, "pretrain.batch_size", "must be >= 2")
        self.views.validate("pretrain.views")


def cosine_lr(base: float, epoch: int, t_max: int) -> float:
    """CosineAnnealingLR(T_max=t_max, eta_min=0) after ``epoch`` scheduler steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / t_max))


def make_optimizer_factory(config: PretrainConfig, lr: float):
    if config.optimizer == "lars":
        from engine.runtime.lars import LARS

        return lambda params: LARS(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _rows(params, sel: slice):
    return type(params)(**{f.name: getattr(params, f.name)[sel] for f in fields(params)})


class Pretrain(Stage):
    name = "pretrain"
    config_class = PretrainConfig
    label = "DBD, SimCLR"
    defense = "dbd"
    # What the result depends on besides this section and ``needs`` (engine.stages.keys).
    depends_on = INPUTS
    evaluates = False
    default_position = 1

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["pretrain.batch_size=16"]

    @classmethod
    def per_layer_optimizer(cls, config: PretrainConfig) -> bool:
        return config.optimizer == "lars"

    def build(self) -> None:
        from engine.models import SimCLRModel

        c, env = self.config, self.env
        batching = plan_batch(c.batch_size, env.distributed, env.dist.world_size, "pretrain.batch_size")
        self.batching = batching
        self.base_lr = batching.scale_lr(c.lr)
        model = SimCLRModel(env.model.arch, env.model.width, env.model.proj_hidden, env.model.proj_dim)
        self.backend = build_backend(model, make_optimizer_factory(c, self.base_lr), env.distributed, env.precision,
                                     env.dist, sync_bn=c.sync_bn, per_rank_batch=batching.per_rank)
        self.loader = env.data.train_loader(batching.per_rank)
        # Every rank must take the same number of steps; the padded shard could allow one more.
        n_samples = len(self.loader.indices)
        steps = min(len(self.loader), n_samples // batching.global_batch)
        if c.iterations_per_epoch > 0:
            steps = min(steps, c.iterations_per_epoch)
        if steps < 1:
            raise UserError(f"pretrain: {n_samples} training images make no full global batch of "
                            f"{batching.global_batch}")
        self.spec = simclr_spec(env.data.config, c.views)
        self.epochs = c.epochs
        self.steps_per_epoch = steps
        self.images_per_step = batching.global_batch

    def batches(self, epoch: int):
        return self.env.data.epoch(self.loader, epoch)

    def on_epoch_start(self, epoch: int) -> None:
        self.backend.set_lr(cosine_lr(self.base_lr, epoch, self.config.schedule_epochs))

    def views(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The step's two SimCLR views of this rank's uint8 images, as one 2B batch."""
        from kernels import sample_simclr_params, simclr_views_stacked

        from engine.runtime.seeds import seed_stream

        dist = self.env.dist
        world, rank = dist.world_size, dist.rank
        b, h, w = images.shape[0], images.shape[1], images.shape[2]
        gen = seed_stream(self.env.seed, "simclr_views", epoch, step, 0, device=images.device)
        params = [_rows(sample_simclr_params(b * world, h, w, self.spec, gen), slice(rank, None, world))
                  for _ in range(2)]
        # Both views are written into one (2B, 3, S, S) buffer, view 1 then view 2, already
        # channels_last: no torch.cat and, with channels_last on, no copy at all.
        x, _ = simclr_views_stacked(images, self.spec, params=params, dtype=torch.float32)
        if not self.env.distributed.channels_last:
            # A channels_last input would make the convolutions run channels_last anyway.
            x = x.contiguous()
        return x

    def prepare(self, batch, epoch: int, step: int) -> torch.Tensor:
        return self.views(batch[0].to(self.env.dist.device, non_blocking=True), epoch, step)

    def update(self, x: torch.Tensor, epoch: int, step: int) -> dict:
        b = x.shape[0] // 2
        self.backend.zero_grad()
        z = self.backend.forward(x)
        loss = nt_xent(z[:b], z[b:], self.config.temperature, self.config.loss)
        self.backend.backward(loss)
        self.backend.step()
        return {"loss": loss.detach()}

    def feature_backbone(self):
        return self.backend.module.backbone

    def summary(self) -> dict:
        return {"global_batch": self.batching.global_batch, "per_rank_batch": self.batching.per_rank}

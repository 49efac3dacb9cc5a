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
from dataclasses import fields

import torch

from engine.data.loaders import LoaderSpec, make_loader
from engine.errors import UserError
from engine.losses.ntxent import nt_xent
from engine.runtime import launch
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.runtime.checkpoint import Checkpointer, save_final_model
from engine.stages.context import MODEL
from engine.stages.features import save_features
from engine.stages.loop import run_loop
from engine.stages.views import simclr_spec


def cosine_lr(base: float, epoch: int, t_max: int) -> float:
    """CosineAnnealingLR(T_max=t_max, eta_min=0) after ``epoch`` scheduler steps."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / t_max))


def make_optimizer_factory(cfg, lr: float):
    p = cfg.pretrain
    if p.optimizer == "lars":
        from engine.runtime.lars import LARS

        return lambda params: LARS(params, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)


def _rows(params, sel: slice):
    return type(params)(**{f.name: getattr(params, f.name)[sel] for f in fields(params)})


def run(ctx) -> dict:
    from kernels import make_generator, sample_simclr_params, simclr_views

    from engine.models import SimCLRModel

    cfg, dist = ctx.cfg, ctx.dist
    p = cfg.pretrain
    plan = plan_batch(p.batch_size, cfg, dist.world_size, "pretrain.batch_size")
    base_lr = plan.scale_lr(p.lr)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every launcher
    model = SimCLRModel(cfg.model.arch, cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim)
    backend = build_backend(model, make_optimizer_factory(cfg, base_lr), cfg, dist,
                            sync_bn=p.sync_bn, per_rank_batch=plan.per_rank)

    loader = make_loader(LoaderSpec(root=cfg.data.root, split="train", batch_size=plan.per_rank, shuffle=True,
                                    drop_last=True, seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                    num_workers=cfg.data.num_workers,
                                    decode_size=cfg.data.decode_size or cfg.data.image_size,
                                    os_cache=cfg.data.os_cache),
                         poison=ctx.poison.train_ops() if ctx.poison is not None else None)
    # Every rank must take the same number of steps; the padded shard could allow one more.
    n_samples = len(loader.indices)
    steps = min(len(loader), n_samples // plan.global_batch)
    if p.iterations_per_epoch > 0:
        steps = min(steps, p.iterations_per_epoch)
    if steps < 1:
        raise UserError(f"pretrain: {n_samples} training images make no full global batch of {plan.global_batch}")

    spec = simclr_spec(cfg, p.views)
    device = dist.device
    world, rank = dist.world_size, dist.rank
    channels_last = cfg.distributed.channels_last

    def batches(epoch: int):
        loader.next_epoch = epoch
        it = iter(loader)
        try:
            yield from it
        finally:
            it.close()

    def train_step(batch, epoch: int, step: int) -> dict:
        images = batch[0].to(device, non_blocking=True)
        b, h, w = images.shape[0], images.shape[1], images.shape[2]
        gen = make_generator(cfg.seed, epoch, step, 0, device)
        params = [_rows(sample_simclr_params(b * world, h, w, spec, gen), slice(rank, None, world))
                  for _ in range(2)]
        views, _ = simclr_views(images, spec, params=params, dtype=torch.float32)
        x = torch.cat(views)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        backend.zero_grad()
        z = backend.forward(x)
        loss = nt_xent(z[:b], z[b:], p.temperature, p.loss)
        backend.backward(loss)
        backend.step()
        return {"loss": loss.detach()}

    def on_epoch_start(epoch: int) -> None:
        backend.set_lr(cosine_lr(base_lr, epoch, p.schedule_epochs))

    result = run_loop(ctx, backend, Checkpointer(ctx.stage_dir, backend, dist), epochs=p.epochs,
                      steps_per_epoch=steps, batches=batches, train_step=train_step,
                      images_per_step=plan.global_batch, on_epoch_start=on_epoch_start, desc="pretrain")
    if dist.is_main:
        save_final_model(ctx.stage_dir / MODEL, backend.module)
    # The report's feature-space picture: where the SimCLR backbone puts poisoned samples.
    save_features(ctx, backend.module.backbone)
    launch.barrier()
    ips = result.images_per_second or (sum(r["images_per_second"] for r in result.history) / len(result.history))
    return {"final_loss": result.last.get("loss"), "epochs": result.epochs, "images_per_second": round(ips, 2),
            "global_batch": plan.global_batch, "per_rank_batch": plan.per_rank, "steps_per_epoch": steps,
            "backend": backend.name, "precision": cfg.precision}

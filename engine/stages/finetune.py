"""DBD stage 3: split by loss at every epoch, then MixMatch over the whole model.

At the start of each epoch the current model (eval mode) scores every training sample
with symmetric CE under training augmentation; the lowest ``epsilon`` fraction keeps
its (possibly poisoned) label, the rest become unlabelled (engine.stages.split). Then
``iterations_per_epoch`` MixMatch steps: K weak views per unlabelled image, guessed
labels sharpened with T, mixup over labelled + unlabelled with lambda = max(l, 1 - l),
interleaved forwards so every BatchNorm batch mixes both parts, Lx + lambda_u * ramp * Lu
with the ramp indexed by the global epoch (linear-stage epochs included, as the
reference). Adam over the whole model, no schedule; an EMA of the weights is optional.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.loaders import set_indices
from engine.errors import UserError
from engine.losses.mixmatch import interleave, linear_rampup, mixmatch_loss, mixup, sharpen
from engine.models import Classifier
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.runtime.checkpoint import Checkpointer, save_final_model
from engine.stages.common import EpochEval, load_weights, train_loader
from engine.stages.context import MODEL
from engine.stages.loop import run_loop
from engine.stages.split import compute_split, split_loader
from engine.stages.views import WeakAugment


class EMA:
    """Exponential moving average of parameters and buffers (MixMatch's evaluation model)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), module.state_dict().values()):
            if e.is_floating_point():
                e.mul_(self.decay).add_(m.detach().to(e.dtype), alpha=1 - self.decay)
            else:
                e.copy_(m)


def cycle(loader, base: int):
    """Endless batches, restarting the loader with a new epoch seed when it runs out."""
    k = 0
    while True:
        loader.next_epoch = base * 1000 + k
        it = iter(loader)
        try:
            yield from it
        finally:
            if hasattr(it, "close"):
                it.close()
        k += 1


def run(ctx) -> dict:
    cfg, dist = ctx.cfg, ctx.dist
    s = cfg.finetune
    plan = plan_batch(s.batch_size, cfg, dist.world_size, "finetune.batch_size")
    B = plan.per_rank
    num_classes = ctx.num_classes
    model = Classifier(cfg.model.arch, cfg.model.width, num_classes)
    load_weights(model, ctx.upstream_model("linear"))
    lr = plan.scale_lr(s.lr)
    backend = build_backend(model, lambda p: torch.optim.Adam(p, lr=lr), cfg, dist, sync_bn=False,
                            per_rank_batch=B)
    augment = WeakAugment(cfg, s.view)
    ema = EMA(backend.module, s.ema_decay) if s.ema_decay > 0 else None
    poisoned = np.asarray(ctx.poison.plan.poisoned, dtype=bool)
    linear_epochs = cfg.linear.epochs if s.ramp_includes_linear else 0
    state: dict = {"split_epoch": -1, "labelled": None}
    loaders: dict = {}

    def on_epoch_start(epoch: int) -> None:
        if state["split_epoch"] != epoch:
            if "split" not in loaders:
                loaders["split"] = split_loader(ctx)
            split = compute_split(ctx, backend.module, augment, epoch, s.epsilon, s.sce_alpha, s.sce_beta,
                                  loader=loaders["split"])
            state.update(split_epoch=epoch, labelled=torch.from_numpy(split.labelled))
            quality = split.quality(poisoned)
            if dist.is_main:
                ctx.metrics.log("split", epoch=epoch, **quality)
                print(f"[finetune] epoch {epoch}: labelled {quality['labelled']}, poisoned share of labelled "
                      f"{quality['labelled_poison_share']:.2f}%, detector recall {quality['recall']:.1f}%", flush=True)
        labelled = state["labelled"].numpy()
        unlabelled = np.setdiff1d(np.arange(len(poisoned)), labelled)
        for name, part in (("labelled", labelled), ("unlabelled", unlabelled)):
            if len(part) < B * dist.world_size:
                raise UserError(f"finetune: the {name} part of the split has {len(part)} samples, fewer than one "
                                f"global batch ({B * dist.world_size}); lower finetune.batch_size or change "
                                f"finetune.epsilon ({s.epsilon})")
        # The loaders are built once; each epoch only swaps their subsets (a rebuild recompiles).
        if "x" not in loaders:
            loaders["x"] = train_loader(ctx, B, indices=labelled, seed_offset=101)
            loaders["u"] = train_loader(ctx, B, indices=unlabelled, seed_offset=202)
        else:
            set_indices(loaders["x"], labelled)
            set_indices(loaders["u"], unlabelled)

    def batches(epoch: int):
        xs, us = cycle(loaders["x"], epoch), cycle(loaders["u"], epoch)
        try:
            while True:
                yield next(xs), next(us)
        finally:
            xs.close()
            us.close()

    def step(batch, epoch, i):
        (x_img, x_lab, _), (u_img, _, _) = batch
        dev = dist.device
        x_img, u_img = x_img.to(dev, non_blocking=True), u_img.to(dev, non_blocking=True)
        kw = dict(seed=cfg.seed, epoch=epoch, step=i, rank=dist.rank)
        xb = augment(x_img, salt=1, **kw)
        ubs = [augment(u_img, salt=2 + k, **kw) for k in range(s.k_views)]
        with torch.no_grad():
            # Label guessing in train mode, as MixMatch and the DBD reference do.
            probs = [F.softmax(o.float(), dim=1) for o in backend.forward_each(ubs)]
            guess = sharpen(sum(probs) / len(probs), s.temperature)
        targets = torch.cat([F.one_hot(x_lab.to(dev), num_classes).float()] + [guess] * s.k_views)
        inputs = torch.cat([xb] + ubs)
        gen = torch.Generator().manual_seed(_mix_seed(cfg.seed, epoch, i, dist.rank))
        mixed_x, mixed_y, _ = mixup(inputs, targets, s.mixup_alpha, generator=gen)
        chunks = interleave(list(torch.split(mixed_x, B)), B)
        logits = interleave(backend.forward_each(chunks), B)
        lx, lu = mixmatch_loss(logits[0], mixed_y[:B], torch.cat(logits[1:]), mixed_y[B:])
        w = s.lambda_u * linear_rampup(linear_epochs + epoch + i / s.iterations_per_epoch, s.rampup_epochs)
        loss = lx + w * lu
        backend.zero_grad()
        backend.backward(loss)
        backend.step()
        if ema is not None:
            ema.update(backend.module)
        return {"loss": loss.detach(), "loss_x": lx.detach(), "loss_u": lu.detach(), "lambda_u": w}

    def stage_state() -> dict:
        out = {"split_epoch": state["split_epoch"], "labelled": state["labelled"]}
        if ema is not None:
            out["ema"] = ema.module.state_dict()
        return out

    def load_stage_state(saved: dict) -> None:
        state.update(split_epoch=int(saved.get("split_epoch", -1)), labelled=saved.get("labelled"))
        if ema is not None and "ema" in saved:
            ema.module.load_state_dict(saved["ema"])

    eval_model = lambda: ema.module if ema is not None else backend.module  # noqa: E731
    evaluate = EpochEval(ctx, eval_model, s.epochs)
    result = run_loop(ctx, backend, Checkpointer(ctx.stage_dir, backend, dist), epochs=s.epochs,
                      steps_per_epoch=s.iterations_per_epoch, batches=batches, train_step=step,
                      images_per_step=plan.global_batch * 2, on_epoch_start=on_epoch_start, on_epoch_end=evaluate,
                      stage_state=stage_state, load_stage_state=load_stage_state)
    final = evaluate.last or evaluate.evaluator(eval_model())
    if dist.is_main:
        save_final_model(ctx.stage_dir / MODEL, eval_model())
    return {**final, "epochs": result.epochs, "final_loss": result.last.get("loss"),
            "images_per_second": round(result.images_per_second, 1)}


def _mix_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    from kernels import mix_seed

    return mix_seed(seed, epoch, step, rank) & 0x7FFF_FFFF_FFFF_FFFF

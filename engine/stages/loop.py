"""The epoch/step driver every training stage uses.

A stage supplies what differs (how to get an epoch's batches, what one step does,
optional epoch hooks and its own state); the loop supplies what must be the same
everywhere: resuming from the latest checkpoint, checkpoints every
``distributed.checkpoint_every`` steps and at each epoch end, metrics records reduced
over ranks, the progress bar on rank 0, and the fault-injection hook used by tests.

Resume is exact because every source of randomness is a function of the position:
the loader order is a pure function of (seed, epoch, rank) and views are seeded from
(seed, epoch, step, rank), so a partly done epoch is resumed by recreating that epoch's
batches and skipping the ones already trained on.

On a mid-epoch resume ``on_epoch_start(epoch)`` runs again (after ``load_stage_state``)
and the RNG states are then set back to the checkpoint's, so a hook that only sets the
learning rate needs no care. A hook that derives state from the model at the start of
an epoch (e.g. a data split) must keep it in ``stage_state`` and reuse it when
``load_stage_state`` already restored it for that epoch.

Fault injection (tests only, read from the environment, never from the config):
``DBD_FAULT_EXIT_AT_STEP=STEP[:RANK[:MODE]]`` makes rank RANK (default 0), just before
global step STEP (0-based), ``exit`` with status 13 (default), ``kill`` itself with
SIGKILL, or ``hang`` forever. It fires once per stage folder (a marker file records
it), so a restarted or rerun job carries on past it.
"""
from __future__ import annotations

import itertools
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from engine.errors import UserError
from engine.report.progress import Progress

FAULT_ENV = "DBD_FAULT_EXIT_AT_STEP"


@dataclass
class LoopResult:
    epochs: int  # epochs completed in total (before and after any resume)
    global_step: int  # optimizer steps completed in total
    history: list[dict] = field(default_factory=list)  # one record per epoch, resumed ones included
    images_per_second: float = 0.0  # over the steps this process ran (0 if it ran none)
    resumed_from: str | None = None  # checkpoint folder, if resumed

    @property
    def last(self) -> dict:
        return self.history[-1] if self.history else {}


def run_loop(ctx, backend, checkpointer, *, epochs: int, steps_per_epoch: int,
             batches: Callable[[int], Iterable], train_step: Callable[[Any, int, int], dict],
             images_per_step: int,
             on_epoch_start: Callable[[int], None] | None = None,
             on_epoch_end: Callable[[int], dict | None] | None = None,
             stage_state: Callable[[], dict] | None = None,
             load_stage_state: Callable[[dict], None] | None = None,
             desc: str | None = None) -> LoopResult:
    """Train ``epochs`` epochs of ``steps_per_epoch`` steps, resuming if a checkpoint exists.

    ``batches(epoch)`` returns an iterable of that epoch's batches (same order every time
    it is called for the same epoch). ``train_step(batch, epoch, step)`` runs one step
    and returns its metrics as floats or 0-d tensors (tensors are only synchronised at
    log steps); the same keys on every rank. ``images_per_step`` is the global number of
    images one step trains on (for images/second). ``on_epoch_end(epoch)`` may return
    extra values for the epoch record (e.g. evaluation results).
    """
    cfg, dist = ctx.cfg, ctx.dist
    if epochs < 1 or steps_per_epoch < 1:
        raise UserError(f"stage {ctx.name}: needs at least one epoch and one step per epoch "
                        f"(got {epochs} epochs of {steps_per_epoch} steps)")
    log_every = max(0, int(cfg.logging.log_every))
    ckpt_every = max(0, int(cfg.distributed.checkpoint_every))
    stage_dir = Path(ctx.stage_dir)
    fault = _parse_fault(os.environ.get(FAULT_ENV, ""))

    start_epoch, start_step, global_step = 0, 0, 0
    history: list[dict] = []
    carried: dict[str, float] = {}  # epoch sums (already rank-averaged) from before a resume
    carried_count = 0
    res = checkpointer.load_latest()
    if res is not None:
        state = res["stage_state"]
        loop_state = state.get("loop", {})
        history = list(loop_state.get("history", []))
        global_step = int(loop_state.get("global_step", 0))
        carried = dict(loop_state.get("partial_sums", {}))
        carried_count = int(loop_state.get("partial_count", 0))
        if load_stage_state is not None:
            load_stage_state(state.get("user", {}))
        start_epoch, start_step = res["epoch"], res["step"]
        if start_step >= steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        if dist.is_main:
            print(f"[{ctx.name}] resuming from {res['path']} (epoch {start_epoch}, step {start_step})", flush=True)

    total = epochs * steps_per_epoch
    progress = Progress(total=total, desc=desc or ctx.name, enabled=bool(cfg.logging.progress) and dist.is_main,
                        initial=min(global_step, total))
    run_images, run_seconds = 0, 0.0

    def checkpoint(epoch: int, step: int, sums: dict, count: int) -> None:
        user = stage_state() if stage_state is not None else {}
        loop_state = {"history": history, "global_step": global_step,
                      "partial_sums": _mean_over_ranks(sums, dist) if count else {}, "partial_count": count}
        checkpointer.save(epoch, step, {"user": user, "loop": loop_state})

    try:
        for epoch in range(start_epoch, epochs):
            backend.train()
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            first = start_step if epoch == start_epoch else 0
            if first and res is not None and res.get("rng") is not None:
                from engine.runtime.checkpoint import set_rng_state

                set_rng_state(res["rng"], dist.device)
            sums: dict[str, Any] = dict(carried) if first else {}
            count = carried_count if first else 0
            iterator = iter(batches(epoch))
            # The epoch order is deterministic: skipping reproduces the interrupted run.
            for _ in itertools.islice(iterator, first):
                pass
            t_epoch = time.perf_counter()
            t_log, images_since_log = t_epoch, 0
            ran = 0
            for step in range(first, steps_per_epoch):
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                if fault is not None:
                    _maybe_fault(fault, global_step, dist.rank, stage_dir)
                out = train_step(batch, epoch, step)
                global_step += 1
                ran += 1
                count += 1
                images_since_log += images_per_step
                for k, v in out.items():
                    v = v.detach().float() if torch.is_tensor(v) else float(v)
                    sums[k] = sums[k] + v if k in sums else v
                logged = None
                if log_every and global_step % log_every == 0:
                    logged = _mean_over_ranks(out, dist)
                    now = time.perf_counter()
                    rate = images_since_log / max(now - t_log, 1e-9)
                    t_log, images_since_log = now, 0
                    if dist.is_main:
                        ctx.metrics.log("step", epoch=epoch, step=step, global_step=global_step - 1,
                                        lr=backend.get_lr(), images_per_second=round(rate, 2),
                                        **_extra(backend), **logged)
                progress.update(images_per_step, **({"loss": logged["loss"]} if logged and "loss" in logged else {}))
                if ckpt_every and global_step % ckpt_every == 0 and step + 1 < steps_per_epoch:
                    checkpoint(epoch, step + 1, sums, count)
            if hasattr(iterator, "close"):
                iterator.close()
            seconds = time.perf_counter() - t_epoch
            run_images += ran * images_per_step
            run_seconds += seconds
            means = {k: v / max(count, 1) for k, v in _mean_over_ranks(sums, dist).items()}
            record = {"epoch": epoch, "steps": count, "global_step": global_step, "lr": backend.get_lr(),
                      "images_per_second": round(ran * images_per_step / max(seconds, 1e-9), 2), **means}
            if on_epoch_end is not None:
                record.update(_plain(on_epoch_end(epoch) or {}))
            history.append(record)
            if dist.is_main:
                ctx.metrics.log("epoch", **record)
            carried, carried_count = {}, 0
            checkpoint(epoch + 1, 0, {}, 0)
    finally:
        progress.close()

    return LoopResult(epochs=len(history), global_step=global_step, history=history,
                      images_per_second=run_images / run_seconds if run_seconds > 0 else 0.0,
                      resumed_from=str(res["path"]) if res is not None else None)


# --------------------------------------------------------------------------- helpers


def _mean_over_ranks(values: dict, dist) -> dict[str, float]:
    """Average each value over ranks (one collective); returns plain floats."""
    if not values:
        return {}
    keys = sorted(values)
    device = dist.device
    vec = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(())
                       if not torch.is_tensor(values[k]) else values[k].detach().to(device, torch.float64).reshape(())
                       for k in keys])
    if dist.distributed and dist.world_size > 1:
        torch.distributed.all_reduce(vec)
        vec = vec / dist.world_size
    return {k: float(v) for k, v in zip(keys, vec.tolist())}


def _plain(obj: Any) -> Any:
    # Records go into checkpoints read back with weights_only=True: no numpy scalars.
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        return obj.item()
    return obj


def _extra(backend) -> dict:
    scale = backend.loss_scale
    return {"loss_scale": scale} if scale != 1.0 else {}


def _parse_fault(spec: str):
    spec = spec.strip()
    if not spec:
        return None
    parts = spec.split(":")
    try:
        step = int(parts[0])
        rank = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    except ValueError:
        raise UserError(f"{FAULT_ENV}={spec!r} must look like STEP[:RANK[:exit|kill|hang]]") from None
    mode = parts[2] if len(parts) > 2 else "exit"
    if mode not in ("exit", "kill", "hang"):
        raise UserError(f"{FAULT_ENV}={spec!r}: mode must be exit, kill or hang")
    return step, rank, mode


def _maybe_fault(fault, global_step: int, rank: int, stage_dir: Path) -> None:
    step, want_rank, mode = fault
    if global_step != step or rank != want_rank:
        return
    marker = stage_dir / f".fault-{step}-{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(mode)
    print(f"[rank {rank}] {FAULT_ENV}: injected fault '{mode}' at step {step}", flush=True)
    if mode == "exit":
        os._exit(13)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)

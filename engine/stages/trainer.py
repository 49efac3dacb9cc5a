"""The one Trainer: runs any :class:`~engine.stages.base.Stage`.

The stage supplies what differs (its model and backend, an epoch's batches, one step,
epoch hooks and its own state); the Trainer supplies what must be the same
everywhere: the seed before the stage builds, resuming from the latest checkpoint,
checkpoints every ``distributed.checkpoint_every`` steps and at each epoch end, metrics
records reduced over ranks, the progress bar on rank 0, evaluation after each epoch,
the final model written atomically, the feature dump, and the stage's ``done.json``
with the size and sha256 of every file the stage wrote (engine.stages.integrity: a
stage is verified before it is reused) and its cost (wall time, images,
device-hours, peak memory, where it ran: engine.runtime.cost; a resumed stage adds
its earlier attempts' time up to their last checkpoint).

Resume is exact because every source of randomness is a function of the position:
the loader order is a pure function of (seed, epoch, rank) and views are seeded from
(seed, epoch, step, rank), so a partly done epoch is resumed by recreating that epoch's
batches and skipping the ones already trained on. On a mid-epoch resume
``on_epoch_start(epoch)`` runs again (after ``load_state_dict``) and the RNG states
are then set back to the checkpoint's.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import UserError
from engine.fsutil import write_json
from engine.report.progress import Progress
from engine.runtime import launch
from engine.runtime.checkpoint import Checkpointer, save_final_model, set_rng_state
from engine.runtime.cost import CostMeter
from engine.stages.base import DONE, MODEL, Stage
from engine.stages.evaluate import Evaluator
from engine.stages.faults import FAULT_ENV, maybe_fault, parse_fault
from engine.stages.integrity import FILES, record
from engine.rundir import FEATURES
from engine.stages.features import save_features


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


class Trainer:
    """Runs one stage to completion: ``Trainer(stage, logging, checkpoint_every).run()``."""

    def __init__(self, stage: Stage, *, logging, checkpoint_every: int = 0):
        self.stage = stage
        self.env = stage.env
        self.logging = logging  # the ``logging`` config section
        self.checkpoint_every = max(0, int(checkpoint_every))
        self.evaluator: Evaluator | None = None
        self.last_eval: dict = {}
        self.meter: CostMeter | None = None
        self.carried_cost: dict = {}  # wall and CPU seconds of earlier attempts (from the checkpoint)

    # ------------------------------------------------------------------ the whole stage
    def run(self) -> dict:
        """Build, train (resuming), evaluate, save; returns what ``done.json`` holds."""
        env, dist = self.env, self.env.dist
        if dist.is_main:
            env.stage_dir.mkdir(parents=True, exist_ok=True)
            print(f"[{env.name}] starting", flush=True)
        launch.barrier()
        self.meter = CostMeter(dist).start()
        try:
            return self._build_fit_save(time.time())
        finally:
            self.meter.close()  # stops its sampler thread, also when the stage failed

    def _build_fit_save(self, t0: float) -> dict:
        env, stage = self.env, self.stage
        dist = env.dist
        # The same initial weights on every rank and under every launcher.
        torch.manual_seed(env.seed)
        stage.build()
        if stage.evaluates:
            self.evaluator = Evaluator(env.data, env.precision)
        result = self.fit()
        final = {}
        if stage.evaluates:
            final = self.last_eval or self.evaluator(stage.eval_module())
        if dist.is_main:
            save_final_model(env.stage_dir / MODEL, stage.eval_module())
            stage.save_outputs(env.stage_dir)
        backbone = stage.feature_backbone() if self.logging.feature_map else None
        if backbone is not None:
            # The report's feature-space picture: where this backbone puts poisoned samples.
            save_features(env.data, env.precision, backbone, env.stage_dir / FEATURES)
        launch.barrier()
        cost = self.meter.finish(result.global_step * stage.images_per_step, self.carried_cost)
        summary = {"stage": env.name, "label": stage.label, "defense": stage.defense, "evaluates": stage.evaluates,
                   "seconds": round(time.time() - t0, 2), "world_size": dist.world_size, **final,
                   "epochs": result.epochs, "final_loss": result.last.get("loss"),
                   "images_per_second": round(result.images_per_second, 1), "steps_per_epoch": stage.steps_per_epoch,
                   "backend": stage.backend.name,
                   "precision": env.precision.name, **stage.summary(), "cost": cost}
        if dist.is_main:
            # Every output is on disk (the barrier above): record what reuse must find intact.
            summary[FILES] = record(env.stage_dir)
            write_json(env.stage_dir / DONE, summary)
            env.metrics.log("stage_done", **{k: v for k, v in summary.items() if _scalar(v)})
            print(f"[{env.name}] done in {summary['seconds']:.1f} s", flush=True)
        launch.barrier()
        return summary

    def _cost_so_far(self) -> dict:
        """Wall seconds (rank 0's) and CPU seconds (summed over ranks) of this and earlier
        attempts, for the checkpoint: a collective."""
        if self.meter is None:
            return dict(self.carried_cost)
        wall, cpu = self.meter.elapsed()
        cpu_sum = self.env.dist.mean_over_ranks({"cpu": cpu})["cpu"] * self.env.dist.world_size
        return {"wall_seconds": float(self.carried_cost.get("wall_seconds", 0.0)) + wall,
                "cpu_seconds": float(self.carried_cost.get("cpu_seconds", 0.0)) + cpu_sum}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, epoch: int) -> dict:
        if self.evaluator is None:
            return {}
        self.last_eval = self.evaluator(self.stage.eval_module())
        if self.env.dist.is_main:
            self.env.metrics.log("eval", epoch=epoch, **self.last_eval)
        return dict(self.last_eval)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> LoopResult:
        """Train ``stage.epochs`` epochs of ``stage.steps_per_epoch`` steps, resuming if a checkpoint exists."""
        env, stage = self.env, self.stage
        if stage.epochs < 1 or stage.steps_per_epoch < 1:
            raise UserError(f"stage {env.name}: needs at least one epoch and one step per epoch "
                            f"(got {stage.epochs} epochs of {stage.steps_per_epoch} steps)")
        checkpointer = Checkpointer(env.stage_dir, stage.backend, env.dist)
        loop = self._resume(checkpointer)
        total = stage.epochs * stage.steps_per_epoch
        progress = Progress(total=total, desc=env.name, enabled=bool(self.logging.progress) and env.dist.is_main,
                            initial=min(loop.global_step, total),
                            interval_s=self.logging.progress_interval_s)
        fault = parse_fault(os.environ.get(FAULT_ENV, ""))
        try:
            for epoch in range(loop.start_epoch, stage.epochs):
                self._epoch(loop, epoch, checkpointer, progress, fault)
        finally:
            progress.close()
        res = loop.resumed
        return LoopResult(epochs=len(loop.history), global_step=loop.global_step, history=loop.history,
                          images_per_second=loop.images / loop.seconds if loop.seconds > 0 else 0.0,
                          resumed_from=str(res["path"]) if res is not None else None)

    def _resume(self, checkpointer: Checkpointer) -> "_Loop":
        """The loop's state: fresh, or from the newest checkpoint (mid-epoch included)."""
        env, stage = self.env, self.stage
        res = checkpointer.load_latest()
        if res is None:
            return _Loop()
        state = res["stage_state"]
        loop_state = state.get("loop", {})
        self.carried_cost = dict(loop_state.get("cost", {}))
        stage.load_state_dict(state.get("user", {}))
        start_epoch, start_step = res["epoch"], res["step"]
        if start_step >= stage.steps_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        if env.dist.is_main:
            print(f"[{env.name}] resuming from {res['path']} (epoch {start_epoch}, step {start_step})", flush=True)
        return _Loop(history=list(loop_state.get("history", [])), global_step=int(loop_state.get("global_step", 0)),
                     carried=dict(loop_state.get("partial_sums", {})),
                     carried_count=int(loop_state.get("partial_count", 0)),
                     start_epoch=start_epoch, start_step=start_step, resumed=res)

    def _checkpoint(self, loop: "_Loop", checkpointer: Checkpointer, epoch: int, step: int, sums: dict,
                    count: int) -> None:
        loop_state = {"history": loop.history, "global_step": loop.global_step,
                      "partial_sums": self.env.dist.mean_over_ranks(sums) if count else {}, "partial_count": count,
                      "cost": self._cost_so_far()}
        checkpointer.save(epoch, step, {"user": self.stage.state_dict(), "loop": loop_state})

    def _epoch(self, loop: "_Loop", epoch: int, checkpointer: Checkpointer, progress: Progress, fault) -> None:
        """One epoch from its first step not yet run: steps, then the epoch record,
        evaluation and the epoch-end checkpoint."""
        env, stage = self.env, self.stage
        stage.backend.train()
        stage.on_epoch_start(epoch)
        first = loop.start_step if epoch == loop.start_epoch else 0
        res = loop.resumed
        if first and res is not None and res.get("rng") is not None:
            set_rng_state(res["rng"], env.dist.device)
        ep = _Epoch(sums=dict(loop.carried) if first else {}, count=loop.carried_count if first else 0)
        iterator = iter(stage.batches(epoch))
        # The epoch order is deterministic: skipping reproduces the interrupted run.
        for _ in itertools.islice(iterator, first):
            pass
        ep.t_start = ep.t_log = time.perf_counter()
        for step in range(first, stage.steps_per_epoch):
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if fault is not None:
                maybe_fault(fault, loop.global_step, env.dist.rank, env.stage_dir)
            self._step(loop, ep, epoch, step, batch, progress)
            if self.checkpoint_every and loop.global_step % self.checkpoint_every == 0 \
                    and step + 1 < stage.steps_per_epoch:
                self._checkpoint(loop, checkpointer, epoch, step + 1, ep.sums, ep.count)
        if hasattr(iterator, "close"):
            iterator.close()
        self._end_epoch(loop, ep, epoch)
        self._checkpoint(loop, checkpointer, epoch + 1, 0, {}, 0)

    def _step(self, loop: "_Loop", ep: "_Epoch", epoch: int, step: int, batch, progress: Progress) -> None:
        """One training step, its sums, and (every ``logging.log_every`` steps) its record."""
        env, stage = self.env, self.stage
        out = stage.train_step(batch, epoch, step)
        loop.global_step += 1
        ep.ran += 1
        ep.count += 1
        ep.images_since_log += stage.images_per_step
        for k, v in out.items():
            v = v.detach().float() if torch.is_tensor(v) else float(v)
            ep.sums[k] = ep.sums[k] + v if k in ep.sums else v
        logged = None
        log_every = max(0, int(self.logging.log_every))
        if log_every and loop.global_step % log_every == 0:
            logged = env.dist.mean_over_ranks(out)
            now = time.perf_counter()
            rate = ep.images_since_log / max(now - ep.t_log, 1e-9)
            ep.t_log, ep.images_since_log = now, 0
            if env.dist.is_main:
                env.metrics.log("step", epoch=epoch, step=step, global_step=loop.global_step - 1,
                                lr=stage.backend.get_lr(), images_per_second=round(rate, 2),
                                **_loss_scale(stage.backend), **logged)
        progress.update(stage.images_per_step, **({"loss": logged["loss"]} if logged and "loss" in logged else {}))

    def _end_epoch(self, loop: "_Loop", ep: "_Epoch", epoch: int) -> None:
        """The epoch's record: mean losses over ranks, images/s, evaluation; logged on rank 0."""
        env, stage = self.env, self.stage
        seconds = time.perf_counter() - ep.t_start
        loop.images += ep.ran * stage.images_per_step
        loop.seconds += seconds
        means = {k: v / max(ep.count, 1) for k, v in env.dist.mean_over_ranks(ep.sums).items()}
        record = {"epoch": epoch, "steps": ep.count, "global_step": loop.global_step, "lr": stage.backend.get_lr(),
                  "images_per_second": round(ep.ran * stage.images_per_step / max(seconds, 1e-9), 2), **means}
        record.update(_plain(self.evaluate(epoch)))
        loop.history.append(record)
        if env.dist.is_main:
            env.metrics.log("epoch", **record)
        loop.carried, loop.carried_count = {}, 0


@dataclass
class _Loop:
    """What the training loop carries from epoch to epoch and into its checkpoints."""

    history: list[dict] = field(default_factory=list)
    global_step: int = 0
    carried: dict = field(default_factory=dict)  # epoch sums (already rank-averaged) from before a resume
    carried_count: int = 0
    start_epoch: int = 0
    start_step: int = 0
    resumed: dict | None = None  # the checkpoint resumed from
    images: int = 0  # trained in this process's run, for its images/s
    seconds: float = 0.0


@dataclass
class _Epoch:
    """One epoch's running sums and its throughput clock."""

    sums: dict[str, Any]
    count: int
    ran: int = 0  # steps run in this process (count also holds those before a resume)
    t_start: float = 0.0
    t_log: float = 0.0
    images_since_log: int = 0


# --------------------------------------------------------------------------- helpers


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


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


def _loss_scale(backend) -> dict:
    scale = backend.loss_scale
    return {"loss_scale": scale} if scale != 1.0 else {}

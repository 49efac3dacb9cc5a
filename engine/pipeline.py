"""``dbd run``: the stages a config lists, each in its own folder under the run dir.

A stage is complete when ``<run_dir>/<stage>/done.json`` exists; complete stages are
skipped, an interrupted one resumes from its latest checkpoint (engine.stages.trainer).
With ``stage_store`` set, each stage folder is a link into that shared store, keyed by
what the stage depends on, so runs that share a stage train it once
(engine.stages.store). After the stages, rank 0 writes ``summary.json`` and
``report.md`` with plots.

A complete stage is reused only when its files check out against the checksums its
``done.json`` records (engine.stages.integrity), in a plain run dir as in a store: a
damaged one is set aside into ``<stage>/.damaged-<time>/`` with one warning line and
rerun from scratch. A stage folder that is a link into a store that was moved or
deleted, in a run without ``stage_store``, is one clear error before any work.

This module wires the run's components together and hands each only its own config
section: the process group (``device``, ``distributed``), the attack (``attack``,
``data``), the data (``data``), and each stage (its section plus a typed StageEnv).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Iterator

from engine.attacks.config import NONE
from engine.config import dump_yaml, save_resolved, to_dict
from engine.data.prepare import load_meta
from engine.data.run_data import DatasetMeta, RunData
from engine.errors import UserError
from engine.report.metrics import MetricsWriter
from engine.rundir import CONFIG
from engine.runtime.precision import Precision
from engine.stages import StageEnv, stage_class
from engine.rundir import DONE, METRICS, REPORT
from engine.stages.integrity import check_finished
from engine.stages.store import StageStore
from engine.stages.trainer import Trainer


def check_dataset(cfg, meta: DatasetMeta) -> None:
    if meta.name != cfg.data.name:
        raise UserError(f"config is for dataset {cfg.data.name!r} but {cfg.data.root} holds "
                        f"{meta.name!r}: set data.name or data.root")
    if cfg.attack.name != NONE and not 0 <= cfg.attack.target < meta.num_classes:
        raise UserError(f"config: attack.target {cfg.attack.target} is outside the {meta.num_classes} classes "
                        f"of {meta.name}")


def preflight(cfg, world_size: int, stages=None) -> None:
    """Every check that can fail on the run config alone, before any stage starts work:
    each stage's batch divides over the ranks, and the DeepSpeed config agrees with the
    run config (precision, batch, clipping, ZeRO stage, LARS)."""
    from engine.runtime.backends import check_backend
    from engine.runtime.batching import plan_batch

    for name in stages or cfg.stages:
        cls = stage_class(name)
        section = cfg.section(name)
        plan = plan_batch(cls.batch_size(section), cfg.distributed, world_size, f"{name}.batch_size")
        check_backend(cfg.distributed, cfg.precision, world_size, per_rank_batch=plan.per_rank,
                      per_layer_optimizer=cls.per_layer_optimizer(section))


def make_stage(cfg, name: str, *, run_dir: Path, dist, data: RunData, metrics: MetricsWriter | None = None):
    """Stage ``name`` of this config, not yet built, with its section and StageEnv.

    ``dbd run`` and the benchmarks build stages through here, so a benchmark times the
    very object a run trains."""
    metrics = metrics if metrics is not None else MetricsWriter(Path(run_dir) / METRICS, enabled=False)
    metrics = metrics.with_context(stage=name)
    if cfg.stage_store:
        metrics = metrics.teed(Path(run_dir) / name / METRICS)  # the store entry keeps its own records
    env = StageEnv(name=name, run_dir=Path(run_dir), seed=cfg.seed, precision=Precision(cfg.precision), dist=dist,
                   data=data, poison=data.poison, model=cfg.model, distributed=cfg.distributed,
                   metrics=metrics)
    return stage_class(name)(cfg.section(name), env)


def run(cfg, *, stages: tuple[str, ...] | None = None) -> dict:
    """Run the stages; a process group that exists already (``dbd sweep``) is used and
    left up, one created here is destroyed at the end."""
    from engine.runtime.launch import barrier, current, init_distributed, shutdown

    if not cfg.data.root:
        raise UserError("config: data.root is empty: point it at a folder written by `dbd prepare`")
    meta = DatasetMeta.from_raw(load_meta(cfg.data.root))
    check_dataset(cfg, meta)
    names = tuple(stages or cfg.stages)
    for name in names:
        stage_class(name)
    run_dir = Path(cfg.run_dir)
    owns_group = current() is None
    dist = init_distributed(cfg.device, cfg.distributed, cfg.runtime)
    sinks: list = []  # live TensorBoard / W&B (rank 0), closed however the run ends
    try:
        preflight(cfg, dist.world_size, names)  # batch divisibility, DeepSpeed config: before any work
        if not cfg.stage_store:
            _check_links(run_dir, names, dist)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _record_config(cfg, run_dir)
        poison = _build_poison(cfg, meta, run_dir, dist, barrier)
        data = RunData(cfg.data, meta, dist, cfg.seed, poison)
        if dist.is_main:
            from engine.report.live import open_sinks

            sinks = open_sinks(cfg.logging, run_dir, to_dict(cfg))
        metrics = MetricsWriter(run_dir / METRICS, enabled=dist.is_main, sinks=sinks)
        store = None
        if cfg.stage_store:
            store = StageStore(cfg.stage_store, to_dict(cfg), dataset_hash=meta.content_hash or str(
                Path(cfg.data.root).resolve()), world_size=dist.world_size,
                device_type=dist.device.type)
        results = {}
        for name in names:
            with store.attach(name, run_dir, dist) if store else _own_folder(name, run_dir, dist) as complete:
                done = run_dir / name / DONE
                if complete:
                    if dist.is_main:
                        if store is None:
                            print(f"[{name}] complete, skipped ({done})", flush=True)
                        else:
                            StageStore.copy_records(name, run_dir)
                    results[name] = json.loads(done.read_text())
                    continue
                stage = make_stage(cfg, name, run_dir=run_dir, dist=dist, data=data, metrics=metrics)
                results[name] = Trainer(stage, logging=cfg.logging,
                                        checkpoint_every=cfg.distributed.checkpoint_every).run()
        for sink in sinks:  # before the report, which replaces the live event files
            sink.close()
        if dist.is_main:
            from engine.defenses import report_columns
            from engine.report.build import build_report

            table = build_report(run_dir, report_columns())
            print(table, flush=True)
            print(f"report: {run_dir / REPORT}", flush=True)
        barrier()
        return results
    finally:
        for sink in sinks:
            sink.close()
        if owns_group:
            shutdown()


@contextlib.contextmanager
def _own_folder(name: str, run_dir: Path, dist) -> Iterator[bool]:
    """A run dir's own stage folder (no store): yields whether the stage is complete and
    intact, rank 0's verdict for every rank; a damaged one is set aside to be rerun."""
    folder = run_dir / name
    complete, problem = False, ""
    if dist.is_main:
        try:
            complete = check_finished(name, folder, f"stage folder {folder}")
        except OSError as e:
            problem = f"stage {name!r}: {folder} is damaged and could not be set aside: {e}"
    if not dist.all_true(not problem):
        raise UserError(problem or f"stage {name!r}: rank 0 could not check {folder}")
    yield dist.all_true(complete or not dist.is_main)


def _check_links(run_dir: Path, names: tuple[str, ...], dist) -> None:
    """Without ``stage_store``, a stage folder that is a link to nowhere (the run used a
    store that was moved or deleted since) is one clear error on every rank, before any
    work, instead of an OSError when the stage starts writing into it."""
    problem = ""
    if dist.is_main:
        for name in names:
            link = run_dir / name
            if link.is_symlink() and not link.exists():
                problem = (f"stage {name!r}: {link} links to {os.readlink(link)}, which does not exist (the stage "
                           f"store this run used was moved or deleted): set stage_store to the store's folder, "
                           f"or delete the link to train the stage in this run dir")
                break
    if not dist.all_true(not problem):
        raise UserError(problem or f"rank 0 found a stage folder of {run_dir} that links to nowhere")


def _record_config(cfg, run_dir: Path) -> None:
    path = run_dir / CONFIG
    if path.is_file() and path.read_text() != dump_yaml(cfg):
        # A resumed run with different settings: keep the earlier one for the record.
        previous = run_dir / f"config.{int(time.time())}.yaml"
        path.rename(previous)
        print(f"note: the config differs from this run dir's earlier one, kept as {previous.name}", flush=True)
    save_resolved(cfg, run_dir)


def _build_poison(cfg, meta: DatasetMeta, run_dir: Path, dist, barrier):
    from engine.attacks.runtime import build_poison

    # Rank 0 draws (or verifies) the plan and saves it; the others load that file, so
    # every rank and every stage sees the same poisoned set.
    poison = build_poison(cfg, meta.raw, run_dir) if dist.is_main else None
    barrier()
    if not dist.is_main:
        poison = build_poison(cfg, meta.raw, run_dir)
    return poison

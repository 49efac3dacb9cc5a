"""``dbd run``: the stages a config lists, each in its own folder under the run dir.

A stage is complete when ``<run_dir>/<stage>/done.json`` exists; complete stages are
skipped, an interrupted one resumes from its latest checkpoint (engine.stages.loop).
After the stages, rank 0 writes ``summary.json`` and ``report.md`` with plots.
"""
from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

from engine.config import Config, dump_yaml, save_resolved
from engine.data.prepare import load_meta
from engine.errors import UserError
from engine.fsutil import write_json
from engine.report.metrics import MetricsWriter
from engine.stages import STAGE_MODULES
from engine.stages.context import DONE, StageContext


def check_dataset(cfg: Config, meta: dict) -> None:
    if meta.get("name") != cfg.data.name:
        raise UserError(f"config is for dataset {cfg.data.name!r} but {cfg.data.root} holds "
                        f"{meta.get('name')!r}: set data.name or data.root")
    n = int(meta["num_classes"])
    if cfg.attack.name != "none" and not 0 <= cfg.attack.target < n:
        raise UserError(f"config: attack.target {cfg.attack.target} is outside the {n} classes of {meta['name']}")


def run(cfg: Config, *, stages: tuple[str, ...] | None = None) -> dict:
    from engine.runtime.launch import barrier, init_distributed, shutdown

    if not cfg.data.root:
        raise UserError("config: data.root is empty: point it at a folder written by `dbd prepare`")
    meta = load_meta(cfg.data.root)
    check_dataset(cfg, meta)
    run_dir = Path(cfg.run_dir)
    dist = init_distributed(cfg)
    try:
        from engine.runtime.backends import preflight

        preflight(cfg, dist.world_size)  # batch divisibility, DeepSpeed config: before any work
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            _record_config(cfg, run_dir)
        poison = _build_poison(cfg, meta, run_dir, dist, barrier)
        metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=dist.is_main)
        results = {}
        for name in stages or cfg.stages:
            ctx = StageContext(cfg=cfg, name=name, run_dir=run_dir, dist=dist, meta=meta, poison=poison,
                               metrics=metrics.with_context(stage=name))
            done = ctx.stage_dir / DONE
            if done.is_file():
                if dist.is_main:
                    print(f"[{name}] complete, skipped ({done})", flush=True)
                results[name] = json.loads(done.read_text())
                continue
            if dist.is_main:
                ctx.stage_dir.mkdir(parents=True, exist_ok=True)
                print(f"[{name}] starting", flush=True)
            barrier()
            t0 = time.time()
            summary = importlib.import_module(STAGE_MODULES[name]).run(ctx)
            summary = {"stage": name, "seconds": round(time.time() - t0, 2), "world_size": dist.world_size,
                       **(summary or {})}
            if dist.is_main:
                write_json(done, summary)
                metrics.log("stage_done", **{k: v for k, v in summary.items() if _scalar(v)})
                print(f"[{name}] done in {summary['seconds']:.1f} s", flush=True)
            barrier()
            results[name] = summary
        if dist.is_main:
            from engine.report.build import build_report

            table = build_report(run_dir)
            print(table, flush=True)
            print(f"report: {run_dir / 'report.md'}", flush=True)
        barrier()
        return results
    finally:
        shutdown()


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or v is None


def _record_config(cfg: Config, run_dir: Path) -> None:
    path = run_dir / "config.yaml"
    if path.is_file() and path.read_text() != dump_yaml(cfg):
        # A resumed run with different settings: keep the earlier one for the record.
        previous = run_dir / f"config.{int(time.time())}.yaml"
        path.rename(previous)
        print(f"note: the config differs from this run dir's earlier one, kept as {previous.name}", flush=True)
    save_resolved(cfg, run_dir)


def _build_poison(cfg: Config, meta: dict, run_dir: Path, dist, barrier):
    from engine.attacks.runtime import build_poison

    # Rank 0 draws (or verifies) the plan and saves it; the others load that file, so
    # every rank and every stage sees the same poisoned set.
    poison = build_poison(cfg, meta, run_dir) if dist.is_main else None
    barrier()
    if not dist.is_main:
        poison = build_poison(cfg, meta, run_dir)
    return poison

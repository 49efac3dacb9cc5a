"""``dbd sweep GRID``: every cell of a grid, one after another, on all the launcher's ranks.

Layout of the sweep folder::

    grid.yaml          the grid file, as run
    cells.json         the index: each cell's values, run dir, status, error, times
    cells/<name>/      an ordinary run dir per cell (config.yaml, summary.json, report.md)
    stages/            the shared stage store (engine.stages.store): every cell's stage
                       folders link here, so a stage that several cells share trains once
    leaderboard.md     written at the end (engine.report.leaderboard)

The process group is made once (from the base config and its overrides) and every cell
runs through ``engine.pipeline.run`` on it. A cell that ``cells.json`` records as done is
skipped (unless its resolved config changed since); any other (pending, running when
the job died, failed) runs, and its stages resume from their checkpoints or are reused
from the store. A cell that raises is
recorded as failed with its error (the traceback in ``cells/<name>/error.txt``) and the
sweep goes on. A failure on only some ranks cannot be caught this way: the others wait
in a collective until ``distributed.timeout_s`` ends the job, and the rerun resumes.
"""
from __future__ import annotations

import gc
import json
import time
import traceback
from pathlib import Path

from engine.errors import UserError
from engine.fsutil import write_json, write_text
from engine.rundir import SWEEP_INDEX as CELLS
from engine.sweep.grid import Grid

STORE = "stages"
DONE, FAILED, RUNNING, PENDING = "done", "failed", "running", "pending"


def cell_run_dir(out: Path, name: str) -> Path:
    return out / "cells" / name


def cell_config(grid: Grid, cell, out: Path):
    """The cell's config with its run dir and the sweep's stage store."""
    import dataclasses

    return dataclasses.replace(cell.config, run_dir=str(cell_run_dir(out, cell.name)),
                               stage_store=str(out / STORE))


def read_index(out: Path) -> dict:
    path = out / CELLS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): fix or remove it") from None


def index_for(grid: Grid, out: Path, mode: str) -> dict:
    """The index for this grid: earlier statuses kept by cell name, new cells pending."""
    from engine.config import to_dict
    from engine.stages.keys import digest

    before = {c["name"]: c for c in read_index(out).get("cells", [])}
    cells = []
    for cell in grid.cells:
        config_hash = digest(to_dict(cell_config(grid, cell, out)))[:16]
        old = before.get(cell.name, {})
        if old.get("config_hash") != config_hash:
            old = {}  # the cell's settings changed (e.g. the overrides): it runs again
        cells.append({"name": cell.name, "index": cell.index, "values": cell.values, "defense": cell.defense,
                      "stages": list(cell.config.stages), "run_dir": str(Path("cells") / cell.name),
                      "status": old.get("status", PENDING), "error": old.get("error"),
                      "started": old.get("started"), "finished": old.get("finished"),
                      "seconds": old.get("seconds"), "config_hash": config_hash})
    return {"grid": str(grid.path), "base": str(grid.base), "keys": grid.keys, "mode": mode, "cells": cells}


def write_index(out: Path, index: dict) -> None:
    write_json(out / CELLS, index)


def prepare_folder(grid: Grid, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = out / "grid.yaml"
    text = grid.path.read_text()
    if record.is_file() and record.read_text() != text:
        record.rename(out / f"grid.{int(time.time())}.yaml")  # the earlier grid, for the record
    write_text(record, text)


def run_sweep(grid: Grid, out: Path) -> int:
    """Run every unfinished cell; returns the number of cells that failed."""
    from engine.pipeline import run
    from engine.runtime import launch

    first = grid.cells[0].config
    dist = launch.init_distributed(first.device, first.distributed)
    failed = 0
    try:
        if dist.is_main:
            prepare_folder(grid, out)
            write_index(out, index_for(grid, out, mode="local"))
        launch.barrier()
        index = read_index(out)
        entries = {c["name"]: c for c in index["cells"]}
        n = len(grid.cells)
        for cell in grid.cells:
            entry = entries[cell.name]
            label = f"[sweep] cell {cell.index + 1}/{n} {cell.name}"
            if entry["status"] == DONE:
                if dist.is_main:
                    print(f"{label}: done, skipped", flush=True)
                continue
            if dist.is_main:
                resumed = entry["status"] in (RUNNING, FAILED)
                print(f"{label}: {'resuming' if resumed else 'starting'}", flush=True)
                entry.update(status=RUNNING, started=entry.get("started") or time.time(), error=None)
                write_index(out, index)
            t0 = time.time()
            error = None
            try:
                run(cell_config(grid, cell, out))
            except Exception as e:  # noqa: BLE001 -- a failing cell is recorded, the sweep goes on
                error = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
                if dist.is_main:
                    run_dir = cell_run_dir(out, cell.name)
                    run_dir.mkdir(parents=True, exist_ok=True)
                    write_text(run_dir / "error.txt", traceback.format_exc())
            launch.barrier()
            if dist.is_main:
                entry.update(status=FAILED if error else DONE, error=error, finished=time.time(),
                             seconds=round((entry.get("seconds") or 0.0) + time.time() - t0, 2))
                write_index(out, index)
                print(f"{label}: {'FAILED: ' + error if error else 'done'}", flush=True)
            failed += error is not None
            gc.collect()  # the cell's loaders, models and optimizer state, before the next cell builds its own
        if dist.is_main:
            from engine.report.leaderboard import build_leaderboard

            print(build_leaderboard(out), flush=True)
            print(f"leaderboard: {out / 'leaderboard.md'}", flush=True)
        launch.barrier()
    finally:
        launch.shutdown()
    return failed

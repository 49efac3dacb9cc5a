"""``dbd sweep GRID``: every cell of a grid, one after another, on all the launcher's ranks.

Layout of the sweep folder::

    grid.yaml          the grid file, as run
    cells.json         the index: each cell's values, run dir, status, error, times
    cells/<name>/      an ordinary run dir per cell (config.yaml, summary.json, report.md)
                       plus status.json, the cell's own status, and error.txt on failure
    stages/            the shared stage store (engine.stages.store): every cell's stage
                       folders link here, so a stage that several cells share trains once
    leaderboard.md     written at the end (engine.report.leaderboard)

Statuses: whoever runs a cell (this runner, or a ``--slurm`` array task through
``dbd run --cell-status``) writes its ``cells/<name>/status.json`` (running, with the
start time, host and Slurm job; then done, or failed with the error's one line and the
traceback file). Those files are the one source of truth: ``cells.json`` is rebuilt from
them (``index_for``, ``refresh_index``), so a Slurm sweep, whose tasks never touch
``cells.json``, shows each cell's real status once the index is refreshed (``dbd
leaderboard`` does). A status file written for other settings of the cell (its
``config_hash`` differs) is stale and ignored. A task killed outright (time limit, node
failure) cannot write anything: its cell stays "running".

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
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from engine.errors import UserError
from engine.fsutil import write_json, write_text
from engine.rundir import CELL_ERROR, CELL_STATUS, LEADERBOARD, Status
from engine.rundir import SWEEP_INDEX as CELLS
from engine.sweep.grid import Grid

STORE = "stages"
# What a cell's status.json contributes to its cells.json entry (the rest of the entry,
# its values, stages and run dir, comes from the grid).
STATUS_FIELDS = ("status", "error", "started", "finished", "seconds", "host", "job", "traceback")


def cell_run_dir(out: Path, name: str) -> Path:
    return out / "cells" / name


def cell_config(grid: Grid, cell, out: Path):
    """The cell's config with its run dir and the sweep's stage store."""
    import dataclasses

    return dataclasses.replace(cell.config, run_dir=str(cell_run_dir(out, cell.name)),
                               stage_store=str(out / STORE))


def config_hash(cfg) -> str:
    """What a status is valid for: the cell's resolved config (run dir and store included)."""
    from engine.config import to_dict
    from engine.stages.keys import digest

    return digest(to_dict(cfg))[:16]


# --------------------------------------------------------------------------- per-cell status


def error_line(e: BaseException) -> str:
    """The error as one line (the traceback goes to error.txt): a UserError's message is
    already what the user needs; anything else is prefixed with its type."""
    text = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(e).__name__


def _job() -> str | None:
    """The Slurm job this process runs in: ``<array job>_<task>`` for an array task."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def read_cell_status(run_dir: Path) -> dict | None:
    path = Path(run_dir) / CELL_STATUS
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # written atomically, so only an edit by hand gets here
        raise UserError(f"{path} is not valid JSON ({e}): fix or remove it") from None
    if not isinstance(status, dict) or status.get("status") not in (Status.RUNNING, Status.DONE, Status.FAILED):
        raise UserError(f"{path}: not a cell status (status must be running, done or failed): fix or remove it")
    return status


def start_status(previous: dict | None, cfg_hash: str) -> dict:
    """The status of an attempt that starts now. The first start and the seconds of
    earlier attempts carry over from ``previous`` (an earlier status, or the index entry),
    as a resumed cell's cost spans all its attempts."""
    previous = previous or {}
    now = time.time()
    return {"status": Status.RUNNING, "started": previous.get("started") or now, "attempt_started": now,
            "finished": None, "seconds": previous.get("seconds"), "error": None, "traceback": None,
            "host": socket.gethostname(), "pid": os.getpid(), "job": _job(), "config_hash": cfg_hash}


def finish_status(status: dict, error: str | None) -> dict:
    """``status`` (from start_status) finished now: done, or failed with ``error`` and
    its traceback in error.txt beside the status file."""
    now = time.time()
    spent = now - status["attempt_started"]
    return {**status, "status": Status.FAILED if error else Status.DONE, "finished": now, "error": error,
            "traceback": CELL_ERROR if error else None,
            "seconds": round((status.get("seconds") or 0.0) + spent, 2)}


def write_cell_status(run_dir: Path, status: dict) -> None:
    write_json(Path(run_dir) / CELL_STATUS, status)


def merge_status(entry: dict, status: dict | None) -> bool:
    """Copy a cell's status file into its cells.json entry; whether anything changed.

    A status written for other settings of the cell (another config hash) is stale and
    left out, as the cell will run again."""
    if status is None:
        return False
    theirs, ours = status.get("config_hash"), entry.get("config_hash")
    if theirs and ours and theirs != ours:
        return False
    new = {k: status.get(k) for k in STATUS_FIELDS}
    if new["traceback"]:
        new["traceback"] = str(Path(entry["run_dir"]) / new["traceback"])
    changed = any(entry.get(k) != v for k, v in new.items())
    entry.update(new)
    return changed


def read_index(out: Path) -> dict:
    path = out / CELLS
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}): fix or remove it") from None


def refresh_index(out: Path) -> dict:
    """cells.json with every cell's status file merged in, rewritten (atomically) when
    that changed anything: how a ``--slurm`` sweep's index learns what its tasks did."""
    out = Path(out)
    index = read_index(out)
    changed = False
    for entry in index.get("cells") or []:
        if isinstance(entry, dict) and entry.get("run_dir"):
            changed |= merge_status(entry, read_cell_status(out / entry["run_dir"]))
    if changed:
        write_index(out, index)
    return index


def index_for(grid: Grid, out: Path, mode: str) -> dict:
    """The index for this grid: earlier statuses kept by cell name (the cells' status
    files over the earlier cells.json), new cells pending."""
    before = {c["name"]: c for c in read_index(out).get("cells", [])}
    cells = []
    for cell in grid.cells:
        cfg_hash = config_hash(cell_config(grid, cell, out))
        old = before.get(cell.name, {})
        if old.get("config_hash") != cfg_hash:
            old = {}  # the cell's settings changed (e.g. the overrides): it runs again
        entry = {"name": cell.name, "index": cell.index, "values": cell.values, "defense": cell.defense,
                 "stages": list(cell.config.stages), "run_dir": str(Path("cells") / cell.name),
                 "status": old.get("status", Status.PENDING), "error": old.get("error"),
                 "started": old.get("started"), "finished": old.get("finished"),
                 "seconds": old.get("seconds"), "config_hash": cfg_hash,
                 "host": old.get("host"), "job": old.get("job"), "traceback": old.get("traceback")}
        merge_status(entry, read_cell_status(cell_run_dir(out, cell.name)))
        cells.append(entry)
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


def _init_group(cfg):
    """The process group made from ``cfg`` as engine.pipeline.run would make it (which
    then uses it and leaves it up)."""
    from engine.runtime import launch

    return launch.init_distributed(cfg.device, cfg.distributed, cfg.runtime)


def run_recorded_cell(status_file: Path, load: Callable[[], tuple[Any, tuple[str, ...] | None]]) -> None:
    """``dbd run --cell-status FILE``: one sweep cell (a ``--slurm`` array task), its
    status recorded in FILE by rank 0 as the local sweep records it.

    ``load`` gives the config and the stages to run. The process group is made here,
    so that rank 0 is known before the run starts (the pipeline uses it and leaves it
    up). Any exception, a UserError included, is recorded as failed with its traceback
    in error.txt beside FILE and raised again, so the task still exits non-zero."""
    from engine.pipeline import run
    from engine.runtime import launch

    run_dir = Path(status_file).parent
    is_main = launch.launcher_rank() == 0  # until the group exists, to record a config that fails to load
    status: dict | None = None
    try:
        cfg, stages = load()
        dist = _init_group(cfg)
        is_main = dist.is_main
        if is_main:
            status = start_status(read_cell_status(run_dir), config_hash(cfg))
            write_cell_status(run_dir, status)
        run(cfg, stages=stages)
    except Exception as e:
        if is_main:
            write_text(run_dir / CELL_ERROR, traceback.format_exc())
            write_cell_status(run_dir, finish_status(status or start_status(read_cell_status(run_dir), ""),
                                                     error_line(e)))
        raise
    else:
        if is_main:
            write_cell_status(run_dir, finish_status(status, None))
    finally:
        launch.shutdown()


def run_sweep(grid: Grid, out: Path) -> int:
    """Run every unfinished cell; returns the number of cells that failed."""
    from engine.pipeline import run
    from engine.runtime import launch

    dist = _init_group(grid.cells[0].config)
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
            run_dir = cell_run_dir(out, cell.name)
            label = f"[sweep] cell {cell.index + 1}/{n} {cell.name}"
            if entry["status"] == Status.DONE:
                if dist.is_main:
                    print(f"{label}: done, skipped", flush=True)
                continue
            status: dict = {}
            if dist.is_main:
                resumed = entry["status"] in (Status.RUNNING, Status.FAILED)
                print(f"{label}: {'resuming' if resumed else 'starting'}", flush=True)
                status = start_status(entry, entry["config_hash"])
                write_cell_status(run_dir, status)  # the cell's own record first, then the index
                merge_status(entry, status)
                write_index(out, index)
            error = None
            try:
                run(cell_config(grid, cell, out))
            except Exception as e:  # noqa: BLE001 -- a failing cell is recorded, the sweep goes on
                error = error_line(e)
                if dist.is_main:
                    write_text(run_dir / CELL_ERROR, traceback.format_exc())
            launch.barrier()
            if dist.is_main:
                status = finish_status(status, error)
                write_cell_status(run_dir, status)
                merge_status(entry, status)
                write_index(out, index)
                print(f"{label}: {'FAILED: ' + error if error else 'done'}", flush=True)
            failed += error is not None
            gc.collect()  # the cell's loaders, models and optimizer state, before the next cell builds its own
        if dist.is_main:
            from engine.defenses import report_columns
            from engine.report.leaderboard import build_leaderboard

            print(build_leaderboard(out, report_columns()), flush=True)
            print(f"leaderboard: {out / LEADERBOARD}", flush=True)
        launch.barrier()
    finally:
        launch.shutdown()
    return failed

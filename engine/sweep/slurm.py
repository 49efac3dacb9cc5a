"""``dbd sweep GRID --slurm``: an sbatch array with one task per cell, in dependency waves.

Writes into the sweep folder:

- ``cells/<name>/cell.yaml``: each cell's resolved config (its run dir and the sweep's
  stage store set), which its array task runs with ``srun ... python -m engine run
  --cell-status cells/<name>/status.json``: rank 0 records the cell's status there as a
  local sweep does (engine.sweep.runner), and ``dbd leaderboard`` merges those files into
  ``cells.json``, so a failed task shows as failed, with its error;
- ``sweep.sbatch``: the array task (``#SBATCH`` lines from the grid's ``slurm``
  section), picking its cell by ``SLURM_ARRAY_TASK_ID``;
- ``submit.sh``: submits the waves, each an array over its cells that starts after the
  previous wave (``--dependency=afterany``);
- ``cells.json``, the sweep's index, as ``dbd sweep`` writes it.

Waves: a cell whose stages are all its own (the first cell to need each stage-store
entry) is in wave 0; a cell that reuses an entry first needed by an earlier cell runs
one wave after that cell's wave, so a shared stage trains once, in its first cell, and
no two tasks ever train the same entry at the same time. ``afterany`` rather than
``afterok``: if the first cell fails, its dependents still start, and the first of them
trains the shared stage itself (the store's lock keeps two of them from doing it at
once: the second fails with a clear error and is rerun by resubmitting).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from engine.errors import UserError
from engine.fsutil import write_text
from engine.rundir import CELL_STATUS
from engine.sweep.grid import Grid
from engine.sweep.runner import STORE, cell_config, index_for, prepare_folder, write_index

CELL_CONFIG = "cell.yaml"


def stage_entries(grid: Grid, out: Path) -> list[list[str]]:
    """Each cell's stage-store entry names, in stage order."""
    from engine.config import to_dict
    from engine.data.prepare import load_meta
    from engine.stages.store import StageStore

    entries = []
    for cell in grid.cells:
        cfg = cell_config(grid, cell, out)
        if not cfg.data.root:
            raise UserError(f"cell {cell.name}: data.root is empty: set it in the grid's overrides")
        meta = load_meta(cfg.data.root)  # the dataset hash keys the shared stages
        world = grid.slurm.nodes * grid.slurm.tasks_per_node
        # Where the tasks will train, not where this script is written (a login node).
        device = cfg.device if cfg.device != "auto" else ("cuda" if grid.slurm.gpus_per_task else "cpu")
        store = StageStore(out / STORE, to_dict(cfg), dataset_hash=meta.get("content_hash") or str(
            Path(cfg.data.root).resolve()), world_size=world, device_type=device)
        entries.append([store.entry(s).name for s in cfg.stages])
    return entries


def waves(entries: list[list[str]]) -> list[int]:
    """The wave of each cell: 0 if it is the first to need each of its entries, else one
    more than the wave of the latest first-user among the entries it reuses."""
    first_user: dict[str, int] = {}
    wave: list[int] = []
    for i, names in enumerate(entries):
        w = 0
        for e in names:
            if e in first_user:
                w = max(w, wave[first_user[e]] + 1)
            else:
                first_user[e] = i
        wave.append(w)
    return wave


def write_slurm(grid: Grid, out: Path) -> tuple[Path, Path]:
    from engine.config import dump_yaml

    out = out.resolve()
    prepare_folder(grid, out)
    write_index(out, index_for(grid, out, mode="slurm"))
    configs = []
    for cell in grid.cells:
        path = out / "cells" / cell.name / CELL_CONFIG
        write_text(path, dump_yaml(cell_config(grid, cell, out)))
        configs.append(path.relative_to(out))
    wave_of = waves(stage_entries(grid, out))
    s = grid.slurm
    python = s.python or sys.executable
    header = ["#!/bin/bash", f"#SBATCH --job-name=dbd-{grid.path.stem}", f"#SBATCH --nodes={s.nodes}",
              f"#SBATCH --ntasks-per-node={s.tasks_per_node}", f"#SBATCH --cpus-per-task={s.cpus_per_task}",
              f"#SBATCH --time={s.time}", f"#SBATCH --output={out}/slurm/%x-%A_%a.out"]
    if s.gpus_per_task:
        header.append(f"#SBATCH --gpus-per-task={s.gpus_per_task}")
    if s.partition:
        header.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        header.append(f"#SBATCH --account={s.account}")
    header += [f"#SBATCH {x}" for x in s.extra]
    cells = "\n".join(f"  {shlex.quote(str(c))}  # {i}" for i, c in enumerate(configs))
    body = f"""
# One array task per cell of {grid.path}; submit.sh passes --array and the dependencies.
# Each task is an ordinary `dbd run` of its cell's config on every rank of the allocation
# (srun starts one process per task; engine.runtime.launch reads SLURM_* for the ranks).
# Rank 0 records the cell's status (running, done, failed with its error) in
# cells/<name>/{CELL_STATUS}; `dbd leaderboard {out}` merges those into cells.json.
set -euo pipefail
cd {shlex.quote(str(out))}
CELLS=(
{cells}
)
CELL="${{CELLS[$SLURM_ARRAY_TASK_ID]}}"
echo "cell $SLURM_ARRAY_TASK_ID: $CELL on $SLURM_JOB_NUM_NODES node(s)"
srun --kill-on-bad-exit=1 {shlex.quote(python)} -m engine run "$CELL" --cell-status "${{CELL%/*}}/{CELL_STATUS}"
"""
    sbatch = out / "sweep.sbatch"
    write_text(sbatch, "\n".join(header) + "\n" + body)
    lines = ["#!/bin/bash", f"# Submits the sweep of {grid.path} in {max(wave_of) + 1} wave(s): a cell that reuses a",
             "# shared stage starts after the wave of the cell that trains it (engine.sweep.slurm).",
             "set -euo pipefail", 'cd "$(dirname "$0")"', "mkdir -p slurm", 'prev=""']
    for w in range(max(wave_of) + 1):
        members = [i for i, x in enumerate(wave_of) if x == w]
        names = ", ".join(grid.cells[i].name for i in members)
        lines += [f"# wave {w}: {names}",
                  f'job=$(sbatch --parsable --array={",".join(map(str, members))} '
                  f'${{prev:+--dependency=afterany:$prev}} sweep.sbatch)',
                  'job="${job%%;*}"; echo "wave ' + str(w) + ': job $job"; prev="$job"']
    submit = out / "submit.sh"
    write_text(submit, "\n".join(lines) + "\n")
    for p in (sbatch, submit):
        p.chmod(0o755)
    return sbatch, submit

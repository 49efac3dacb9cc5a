"""``dbd sweep --slurm``: the generated scripts, their waves and how submit.sh chains them,
and what an array task records of its cell.

There is no Slurm here: submit.sh runs against an ``sbatch`` stand-in that records its
arguments and answers a job id, which is all submit.sh asks of it; the array tasks run
sweep.sbatch itself as Slurm would, with ``SLURM_ARRAY_TASK_ID`` set and an ``srun``
stand-in that sets the variables of a one-task step and execs its command."""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import load_config
from engine.defenses import report_columns
from engine.report.leaderboard import build_leaderboard
from engine.sweep.runner import refresh_index
from engine.sweep.grid import load_grid
from engine.sweep.slurm import waves
from tests.sweep.test_sweep_run import TINY


def test_waves_by_hand():
    # 0 trains a; 1 trains b; 2 reuses a (after 0); 3 reuses c of 2 (after 2) and b.
    assert waves([["a"], ["b"], ["a", "c"], ["c", "b", "d"]]) == [0, 0, 1, 2]


def test_slurm_files(tmp_path, digits_root):
    grid_path = tmp_path / "ablation.yaml"
    grid_path.write_text(yaml.safe_dump({
        "base": "configs/demo/digits_badnets_dbd.yaml",
        "overrides": {"data.root": str(digits_root)},
        "grid": {"attack.name": ["badnets", "blended"], "finetune.lambda_u": [15, 5], "defense": ["none", "dbd"]},
        "slurm": {"nodes": 2, "tasks_per_node": 4, "gpus_per_task": 1, "cpus_per_task": 6, "time": "12:00:00",
                  "partition": "gpu", "extra": ["--mem=200G"]},
    }, sort_keys=False))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "engine", "sweep", str(grid_path), "--slurm", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sbatch = (out / "sweep.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=6", "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --mem=200G", f"#SBATCH --output={out.resolve()}/slurm/%x-%A_%a.out"):
        assert line in sbatch.splitlines(), line
    assert (f'srun --kill-on-bad-exit=1 {sys.executable} -m engine run "$CELL" '
            '--cell-status "${CELL%/*}/status.json"') in sbatch.splitlines()
    grid = load_grid(grid_path)
    listed = re.findall(r"^  (\S+)  # (\d+)$", sbatch, flags=re.M)
    assert [int(i) for _, i in listed] == list(range(8))
    for (path, _), cell in zip(listed, grid.cells):
        assert path == f"cells/{cell.name}/cell.yaml"
        cfg = load_config(out / path)  # what the task runs: the cell's config, in the sweep's folders
        assert cfg.run_dir == str(out.resolve() / "cells" / cell.name)
        assert cfg.stage_store == str(out.resolve() / "stages")
        assert (cfg.attack.name, cfg.finetune.lambda_u, cfg.stages) == (cell.config.attack.name,
                                                                         cell.config.finetune.lambda_u,
                                                                         cell.config.stages)
    for script in ("sweep.sbatch", "submit.sh"):
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0

    # Cells in product order (attack, lambda_u, defense). The lambda_u=5 cells reuse the
    # baseline (which ignores finetune.*) or SimCLR and the linear stage of the lambda_u=15
    # cells: they wait one wave.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    fake = bin_dir / "sbatch"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {log}\nn=$(wc -l < {log})\necho "100$n;cluster"\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(out / "submit.sh")], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    assert calls == ["--parsable --array=0,1,4,5 sweep.sbatch",
                     "--parsable --array=2,3,6,7 --dependency=afterany:1001 sweep.sbatch"]
    assert "wave 0: job 1001" in r.stdout and "wave 1: job 1002" in r.stdout
    index = yaml.safe_load((out / "cells.json").read_text())
    assert index["mode"] == "slurm" and [c["status"] for c in index["cells"]] == ["pending"] * 8


SRUN = """#!/bin/bash
# srun stand-in: one task on this node, the variables a real step sets, then the command.
while [[ "$1" == --* ]]; do shift; done
export SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 SLURM_STEP_NUM_TASKS=1 SLURM_NTASKS=1
export SLURM_STEP_TASKS_PER_NODE=1 SLURM_STEP_NODELIST=127.0.0.1
exec "$@"
"""


def array_task(out: Path, task: int, bin_dir: Path, **env) -> subprocess.CompletedProcess:
    """Task ``task`` of array job 4242, as Slurm runs it: the batch script, in its folder."""
    return subprocess.run(["bash", str(out / "sweep.sbatch")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
                               "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(task),
                               "SLURM_JOB_ID": str(4300 + task), "SLURM_JOB_NUM_NODES": "1", **env})


@pytest.mark.slow
def test_array_tasks_record_their_cells(tmp_path, color_root):
    """A task whose cell fails records it failed, with its error and traceback; one that is
    killed stays running; one that finishes records done. `dbd leaderboard` then shows each
    cell's real status in cells.json, leaderboard.md, the CSV and the plots."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(TINY))
    grid = tmp_path / "grid.yaml"
    # attack.target 99 passes the grid's checks (the dataset is not read there) and fails
    # the run: the pattern dataset has 10 classes.
    grid.write_text(yaml.safe_dump({"base": str(base), "overrides": {"data.root": str(color_root)},
                                    "grid": {"attack.target": [0, 99], "defense": ["none"]}}, sort_keys=False))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "engine", "sweep", str(grid), "--slurm", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    ok, bad = (out / "cells" / f"attack.target-{t}__defense-none" for t in (0, 99))

    # Task 0 killed at its 4th step (a time limit, a node failure): nothing can record it.
    killed = array_task(out, 0, bin_dir, DBD_FAULT_EXIT_AT_STEP="3:0:kill")
    assert killed.returncode != 0, killed.stdout[-2000:]
    status = json.loads((ok / "status.json").read_text())
    assert status["status"] == "running" and status["job"] == "4242_0" and status["host"] == socket.gethostname()
    assert status["finished"] is None and status["started"] > 0
    refresh_index(out)  # what `dbd leaderboard` does before the table
    build_leaderboard(out, report_columns())
    md = (out / "leaderboard.md").read_text()
    assert "## Unfinished cells" in md and f"- {ok.name}: started " in md and "Slurm job 4242_0" in md
    assert json.loads((out / "cells.json").read_text())["cells"][0]["status"] == "running"

    failed = array_task(out, 1, bin_dir)
    assert failed.returncode != 0 and "error: config: attack.target 99 is outside the 10 classes" in failed.stderr
    done = array_task(out, 0, bin_dir)  # the resubmitted task resumes and finishes its cell
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    status = json.loads((bad / "status.json").read_text())
    assert status["status"] == "failed" and status["job"] == "4242_1" and status["host"] == socket.gethostname()
    assert status["error"] == "config: attack.target 99 is outside the 10 classes of cifar10"
    assert status["traceback"] == "error.txt" and "Traceback" in (bad / "error.txt").read_text()
    status = json.loads((ok / "status.json").read_text())
    assert status["status"] == "done" and status["error"] is None and status["job"] == "4242_0"
    assert status["seconds"] > 0 and status["finished"] >= status["started"]

    # The tasks never touch cells.json; the leaderboard merges their status files into it.
    before = json.loads((out / "cells.json").read_text())
    assert [c["status"] for c in before["cells"]] == ["running", "pending"]
    r = subprocess.run([sys.executable, "-m", "engine", "leaderboard", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "cells.json").read_text())
    assert index["mode"] == "slurm"
    cells = {c["name"]: c for c in index["cells"]}
    assert cells[ok.name]["status"] == "done" and cells[ok.name]["error"] is None
    assert cells[ok.name]["config_hash"] == before["cells"][0]["config_hash"]
    assert cells[bad.name]["status"] == "failed" and cells[bad.name]["job"] == "4242_1"
    assert cells[bad.name]["error"] == "config: attack.target 99 is outside the 10 classes of cifar10"
    assert cells[bad.name]["traceback"] == f"cells/{bad.name}/error.txt"
    md = (out / "leaderboard.md").read_text()
    assert "## Failed cells" in md and "## Unfinished cells" not in md
    assert f"- {bad.name}: config: attack.target 99 is outside the 10 classes of cifar10" in md
    rows = {r["attack.target"]: r for r in csv.DictReader((out / "leaderboard.csv").open())}
    assert rows["0"]["status"] == "done" and rows["0"]["errors"] == "" and float(rows["0"]["BA"]) >= 0
    assert rows["99"]["status"] == "1 failed" and rows["99"]["BA"] == ""
    assert "attack.target 99 is outside the 10 classes" in rows["99"]["errors"]
    for png in ("leaderboard_ba_asr.png", "leaderboard_cost.png"):
        assert (out / "plots" / png).stat().st_size > 5000


def test_config_that_fails_to_load_is_recorded(tmp_path, monkeypatch, capsys):
    """A cell whose config cannot even be loaded is recorded failed too (rank 0 is read
    from the launcher's variables then), and the command still exits non-zero."""
    from engine.cli import main

    status_file = tmp_path / "cells" / "c" / "status.json"
    assert main(["run", str(tmp_path / "missing.yaml"), "--cell-status", str(status_file)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    status = json.loads(status_file.read_text())
    assert status["status"] == "failed" and "missing.yaml" in status["error"] and "\n" not in status["error"]
    assert (status_file.parent / "error.txt").is_file()
    # Another rank of the same launch records nothing: rank 0's file is the one.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = tmp_path / "rank1" / "status.json"
    assert main(["run", str(tmp_path / "missing.yaml"), "--cell-status", str(other)]) == 2
    assert not other.exists()

"""``dbd sweep --slurm``: the generated scripts, their waves and how submit.sh chains them.

There is no Slurm here: submit.sh runs against an ``sbatch`` stand-in that records its
arguments and answers a job id, which is all submit.sh asks of it."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from engine.config import load_config
from engine.sweep.grid import load_grid
from engine.sweep.slurm import waves


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
    assert f'srun --kill-on-bad-exit=1 {sys.executable} -m engine run "$CELL"' in sbatch
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

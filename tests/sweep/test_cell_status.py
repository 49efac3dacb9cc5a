"""A local ``dbd sweep`` writes each cell's ``status.json`` as a ``--slurm`` array task
does (tests/sweep/test_slurm_script.py), and its cells.json says the same: one source
of truth for both modes. The cell fails in the run's dataset check, before any
training, so this costs one process start."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import yaml

from engine.rundir import CELL_STATUS
from engine.sweep.runner import STATUS_FIELDS
from tests.sweep.test_sweep_run import TINY


def test_local_sweep_writes_the_cell_status(tmp_path, color_root):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(TINY))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": str(base), "overrides": {"data.root": str(color_root)},
                                    "grid": {"attack.target": [99], "defense": ["none"]}}, sort_keys=False))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "engine", "sweep", str(grid), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    name = "attack.target-99__defense-none"
    status = json.loads((out / "cells" / name / CELL_STATUS).read_text())
    error = "config: attack.target 99 is outside the 10 classes of cifar10"
    assert status["status"] == "failed" and status["error"] == error and status["host"] == socket.gethostname()
    assert status["traceback"] == "error.txt" and "Traceback" in (out / "cells" / name / "error.txt").read_text()
    entry = json.loads((out / "cells.json").read_text())["cells"][0]
    assert entry["config_hash"] == status["config_hash"]
    for key in STATUS_FIELDS:
        want = f"cells/{name}/error.txt" if key == "traceback" else status[key]
        assert entry[key] == want, key
    assert f"- {name}: {error} (traceback: `cells/{name}/error.txt`)" in (out / "leaderboard.md").read_text()

"""Grid files: every bad one fails before any work with the key named (through the CLI,
exit 2, nothing written), and a good one expands to named cells with the right stages."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from engine.errors import UserError
from engine.sweep.grid import defense_stages, load_grid

BASE = "configs/demo/digits_badnets_dbd.yaml"


def grid_file(tmp_path, **raw):
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump({"base": BASE, **raw}, sort_keys=False))
    return p


def test_cells_names_and_stages(tmp_path):
    g = load_grid(grid_file(tmp_path, overrides={"data.num_workers": 1},
                            grid={"attack.name": ["badnets", "wanet"], "finetune.epsilon": [0.3, 0.5],
                                  "defense": ["none", "dbd"], "seed": [0, 1]}))
    assert len(g.cells) == 16
    c = g.cells[3]  # product order: badnets, 0.3, dbd, seed 1
    assert c.name == "attack.name-badnets__finetune.epsilon-0.3__defense-dbd__seed-1"
    assert c.config.stages == ("pretrain", "linear", "finetune") and c.config.finetune.epsilon == 0.3
    assert c.config.seed == 1 and c.config.data.num_workers == 1 and c.config.attack.name == "badnets"
    assert g.cells[0].config.stages == ("supervised",)
    assert c.values == {"attack.name": "badnets", "finetune.epsilon": 0.3, "defense": "dbd", "seed": 1}


def test_defense_stages():
    assert defense_stages("none") == ("supervised",)
    assert defense_stages("dbd") == ("pretrain", "linear", "finetune")
    assert defense_stages("dbd_labelled_only") == ("pretrain", "linear", "finetune_labelled")
    assert defense_stages("abl") == ("abl",) and defense_stages("asd") == ("asd",)


@pytest.mark.parametrize("raw, message", [
    ({"grid": {"attack.rato": [0.1]}}, "unknown key 'attack.rato'; did you mean 'attack.ratio'?"),
    ({"grid": {"attack.ratio": []}}, "grid key 'attack.ratio' has an empty list of values"),
    ({"grid": {"attack.ratio": [0.1, "high"]}}, "attack.ratio must be a number, got 'high'"),
    ({"grid": {"attack.ratio": 0.1}}, "grid key 'attack.ratio' must list its values"),
    ({"grid": {"seed": [0, 0]}}, "grid key 'seed' lists a value twice"),
    ({"grid": {"defense": ["none", "strip"]}}, "unknown defense 'strip'"),
    ({"grid": {"device": ["cpu", "cuda"]}}, "grid key 'device' cannot vary within one sweep"),
    ({"grid": {"run_dir": ["a"]}}, "run_dir is set by the sweep"),
    ({"grid": {}}, "grid is empty"),
    ({"grid": {"seed": [0]}, "overides": {}}, "unknown top-level key 'overides'"),
    ({"grid": {"seed": [0]}, "overrides": {"model.widht": 8}}, "unknown key 'model.widht'"),
    ({"grid": {"seed": [0]}, "slurm": {"nodes": "two"}}, "slurm.nodes must be an integer"),
    ({"grid": {"attack.ratio": [0.1, 1.5]}}, "attack.ratio must be in (0, 1]"),
])
def test_bad_grid_files(tmp_path, raw, message):
    with pytest.raises(UserError, match=None) as e:
        load_grid(grid_file(tmp_path, **raw))
    assert message in str(e.value)


def test_bad_grid_through_the_cli_writes_nothing(tmp_path):
    p = grid_file(tmp_path, grid={"attack.name": ["badnets", "blendd"]})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "engine", "sweep", str(p), "--out", str(out)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "attack.name must be one of" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    missing = subprocess.run([sys.executable, "-m", "engine", "sweep", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "grid file not found" in missing.stderr

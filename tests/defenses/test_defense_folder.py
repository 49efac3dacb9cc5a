"""A defense is one folder: a throwaway defense written to a temporary folder (named by
``DBD_DEFENSE_PATH``), with no other file edited, is registered with its config section,
picked up by the test matrix and the GPU check (they loop over the registry), runs as a
sweep's ``defense`` axis value, and gets its row in the cell's report and in the
leaderboard beside the no-defense baseline, with the report column its folder declares."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

STAGE = '''"""A throwaway defense for the test: the baseline's training under another name."""
from dataclasses import dataclass

from engine.defenses.none.supervised import Supervised, SupervisedConfig
from engine.stages.base import INPUTS


@dataclass
class ToyConfig(SupervisedConfig):
    pass


class Toy(Supervised):
    name = "toy"
    config_class = ToyConfig
    label = "toy defense"
    defense = "toy"
    depends_on = INPUTS
    default_position = None

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        return ["toy.batch_size=16"]
'''
# Its own leaderboard and report figure: the BA of each epoch's evaluation, the last one shown.
COLUMNS = '''"""The toy defense."""
from engine.report.columns import DefenseColumn


def report_columns():
    return (DefenseColumn(defenses=("toy",), record_kind="eval", field="BA", summary_key="toy_ba",
                          metric="toy_ba", header="toy BA per epoch", short_header="toy BA",
                          legend="toy BA: the BA of the last epoch's evaluation"),)
'''
TINY = {
    "seed": 0, "device": "cpu",
    "data": {"name": "digits", "num_workers": 1, "horizontal_flip": False},
    "attack": {"name": "badnets", "target": 0, "ratio": 0.1, "select_from": "all"},
    "model": {"arch": "cifar_resnet18", "width": 4},
    "supervised": {"epochs": 1, "iterations_per_epoch": 3, "batch_size": 32},
    "toy": {"epochs": 1, "iterations_per_epoch": 3, "batch_size": 32},
    "logging": {"progress": False, "log_every": 1, "feature_map": False},
}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("lab_defenses")
    (folder / "toy").mkdir()
    (folder / "toy" / "__init__.py").write_text(COLUMNS)
    (folder / "toy" / "stage.py").write_text(STAGE)
    return {**os.environ, "DBD_DEFENSE_PATH": str(folder), "OMP_NUM_THREADS": "1"}


def test_the_registries_find_the_folder(plugin_env):
    probe = ("import json\n"
             "from engine.defenses import DEFENSES\n"
             "from engine.config import load_config\n"
             "from engine.sweep.grid import defense_stages, known_defenses\n"
             "from tests.stages.stage_matrix import stage_names, tiny\n"
             "from benchmarks.gpu import checked_stages\n"
             "print(json.dumps({'defenses': DEFENSES, 'known': list(known_defenses()),\n"
             "                  'stages': defense_stages('toy'), 'matrix': list(stage_names()), 'tiny': tiny(),\n"
             "                  'gpu': list(checked_stages()),\n"
             "                  'section': load_config(None, ['toy.lr=0.5']).toy.lr}))\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=plugin_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "toy" in got["defenses"] and "toy" in got["known"]
    assert got["stages"] == ["toy"] and "toy" in got["matrix"] and "toy" in got["gpu"]
    assert "toy.batch_size=16" in got["tiny"] and got["section"] == 0.5


def test_a_sweep_reports_the_new_defense_beside_the_baseline(plugin_env, tmp_path, digits_root):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(TINY))
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": str(base), "overrides": {"data.root": str(digits_root)},
                                    "grid": {"defense": ["none", "toy"]}}, sort_keys=False))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "engine", "sweep", str(grid), "--out", str(out)], cwd=REPO,
                       env=plugin_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["defense"]: row for row in csv.DictReader((out / "leaderboard.csv").open())}
    assert set(rows) == {"none", "toy"}
    assert rows["toy"]["status"] == "done" and float(rows["toy"]["BA"]) >= 0
    assert rows["toy"]["BA_drop"] not in ("", None)  # measured against the baseline row
    cell = out / "cells" / "defense-toy"
    report = (cell / "report.md").read_text()
    assert "| toy defense (toy) |" in report
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["toy"]["BA"] is not None
    # Its own column, declared in its folder: in the summary, the report and the leaderboard;
    # DBD's split column is not, as no DBD stage ran.
    assert len(summary["toy"]["toy_ba"]) == TINY["toy"]["epochs"]
    assert "| toy BA per epoch |" in report and "poisoned share" not in report
    assert float(rows["toy"]["toy_ba"]) == pytest.approx(summary["toy"]["toy_ba"][-1])
    assert rows["none"]["toy_ba"] == "" and "poisoned_share" not in rows["toy"]
    assert "toy BA: the BA of the last epoch's evaluation" in (out / "leaderboard.md").read_text()


def test_a_missing_defense_folder_is_one_clear_error(tmp_path):
    env = {**os.environ, "DBD_DEFENSE_PATH": str(tmp_path / "nowhere")}
    r = subprocess.run([sys.executable, "-m", "engine", "run", "configs/demo/digits_badnets_dbd.yaml"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"DBD_DEFENSE_PATH names {tmp_path / 'nowhere'}, which is not a folder" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr

"""The leaderboard's arithmetic on a sweep folder written by hand: mean ± sample std over
seeds, BA drop and ASR reduction against the matching no-defense row, the cost columns,
shared stages counted once in the sweep total, failed and unstarted cells shown."""
from __future__ import annotations

import csv
import json
import statistics

import pytest

from engine.report.leaderboard import build_leaderboard

BA = {"none": [99.0, 98.0, 97.0], "dbd": [96.0, 95.0, 97.0]}
ASR = {"none": [100.0, 98.0, 99.0], "dbd": [0.0, 1.0, 2.0]}
SPLIT = [[0.5, 0.2], [0.4, 0.3], [0.1, 0.6]]  # per seed, per epoch (the last counts)


def cost(wall, hours):
    return {"wall_seconds": wall, "images": 1000, "images_per_second": 1000 / wall, "device_hours": hours,
            "device_hours_unit": "CPU core-hours", "cpu_core_hours": hours, "peak_host_rss_mib": 500.0 + wall,
            "peak_gpu_memory_mib": None, "world_size": 1, "device": "CPU: test", "commit": "abc",
            "versions": {"torch": "x"}}


def write_stage(folder, name, evaluates, defense, cost_, **metrics):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "done.json").write_text(json.dumps({"stage": name, "evaluates": evaluates, "defense": defense,
                                                  "cost": cost_, **metrics}))


@pytest.fixture
def sweep(tmp_path):
    cells = []
    store = tmp_path / "stages"
    for seed in range(3):
        for defense in ("none", "dbd"):
            name = f"attack.name-badnets__defense-{defense}__seed-{seed}"
            run = tmp_path / "cells" / name
            run.mkdir(parents=True)
            m = {"BA": BA[defense][seed], "ASR": ASR[defense][seed], "RA": 50.0 + seed}
            if defense == "none":
                stages = ["supervised"]
                write_stage(store / f"supervised-{seed}", "supervised", True, "none", cost(100.0, 0.05), **m)
                (run / "supervised").symlink_to(store / f"supervised-{seed}")
            else:
                stages = ["pretrain", "finetune"]
                # One SimCLR shared by every seed's DBD cell (as if the seed did not matter).
                if not (store / "pretrain-x").exists():
                    write_stage(store / "pretrain-x", "pretrain", False, "dbd", cost(300.0, 0.2))
                (run / "pretrain").symlink_to(store / "pretrain-x")
                write_stage(store / f"finetune-{seed}", "finetune", True, "dbd", cost(200.0, 0.1), **m)
                (run / "finetune").symlink_to(store / f"finetune-{seed}")
                (run / "summary.json").write_text(json.dumps({"finetune": {"split": SPLIT[seed]}}))
            if defense == "none":
                (run / "summary.json").write_text(json.dumps({"attack_implanted": True}))
            cells.append({"name": name, "values": {"attack.name": "badnets", "defense": defense, "seed": seed},
                          "defense": defense, "stages": stages, "run_dir": f"cells/{name}", "status": "done"})
    cells.append({"name": "attack.name-wanet__defense-dbd__seed-0", "defense": "dbd", "stages": ["pretrain"],
                  "values": {"attack.name": "wanet", "defense": "dbd", "seed": 0},
                  "run_dir": "cells/attack.name-wanet__defense-dbd__seed-0", "status": "failed",
                  "error": "finetune: out of memory"})
    cells.append({"name": "attack.name-wanet__defense-none__seed-0", "defense": "none", "stages": ["supervised"],
                  "values": {"attack.name": "wanet", "defense": "none", "seed": 0},
                  "run_dir": "cells/attack.name-wanet__defense-none__seed-0", "status": "pending"})
    (tmp_path / "cells.json").write_text(json.dumps({"grid": "g.yaml", "base": "b.yaml",
                                                     "keys": ["attack.name", "defense", "seed"], "cells": cells}))
    return tmp_path


def test_leaderboard_numbers(sweep):
    build_leaderboard(sweep)
    rows = {(r["attack.name"], r["defense"]): r for r in csv.DictReader((sweep / "leaderboard.csv").open())}
    assert len(rows) == 4
    none, dbd = rows[("badnets", "none")], rows[("badnets", "dbd")]
    assert float(none["BA"]) == pytest.approx(98.0) and float(none["BA_std"]) == pytest.approx(1.0)
    assert float(dbd["BA"]) == pytest.approx(96.0) and float(dbd["ASR"]) == pytest.approx(1.0)
    assert float(dbd["ASR_std"]) == pytest.approx(statistics.stdev(ASR["dbd"]))
    assert float(dbd["RA"]) == pytest.approx(51.0)
    assert float(dbd["poisoned_share"]) == pytest.approx((0.2 + 0.3 + 0.6) / 3)
    assert float(dbd["BA_drop"]) == pytest.approx(2.0) and float(dbd["ASR_reduction"]) == pytest.approx(98.0)
    assert none["BA_drop"] == "" and none["poisoned_share"] == "" and dbd["seeds"] == "3"
    # A cell's cost counts every stage it used, the shared SimCLR included.
    assert float(dbd["wall_seconds"]) == pytest.approx(500.0) and float(dbd["device_hours"]) == pytest.approx(0.3)
    assert float(dbd["peak_host_rss_mib"]) == pytest.approx(800.0)
    assert rows[("wanet", "dbd")]["status"] == "1 failed" and rows[("wanet", "dbd")]["BA"] == ""
    assert rows[("wanet", "none")]["status"] == "1 not run"
    md = (sweep / "leaderboard.md").read_text()
    assert dbd["implanted"] == none["implanted"] == "True" and rows[("wanet", "dbd")]["implanted"] == ""
    assert "| badnets | dbd | 3/3 | done | yes | 96.00 ± 1.00 | 1.00 ± 1.00 |" in md
    assert "- attack.name-wanet__defense-dbd__seed-0: finetune: out of memory" in md
    # The sweep's own total: 3 baselines, 1 shared SimCLR, 3 fine-tunings = 300+300+600 s and
    # 3 x 0.05 + 0.2 + 3 x 0.1 core-hours.
    assert "Sweep total: 20.0 min of stage wall time and 0.6500 CPU core-hours for 7 distinct stages" in md
    assert "the cells' own costs add up to 30.0 min" in md
    assert (sweep / "plots" / "leaderboard_ba_asr.png").stat().st_size > 5000

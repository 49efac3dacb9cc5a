"""The leaderboard's arithmetic on a sweep folder written by hand: mean ± sample std over
seeds, BA drop and ASR reduction against the matching no-defense row, the cost columns,
shared stages counted once in the sweep total, failed and unstarted cells shown (in the
table, the CSV and both plots), the cells' status files merged into cells.json."""
from __future__ import annotations

import csv
import json
import statistics

import pytest

from engine.defenses import report_columns
from engine.sweep.runner import refresh_index
from engine.report.leaderboard import build_leaderboard, group_rows, leaderboard_plots, read_cell

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
    build_leaderboard(sweep, report_columns())
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
    assert rows[("wanet", "dbd")]["errors"] == "attack.name-wanet__defense-dbd__seed-0: finetune: out of memory"
    assert dbd["errors"] == none["errors"] == ""
    md = (sweep / "leaderboard.md").read_text()
    assert dbd["implanted"] == none["implanted"] == "True" and rows[("wanet", "dbd")]["implanted"] == ""
    assert "| badnets | dbd | 3/3 | done | yes | 96.00 ± 1.00 | 1.00 ± 1.00 |" in md
    assert "- attack.name-wanet__defense-dbd__seed-0: finetune: out of memory" in md
    # The sweep's own total: 3 baselines, 1 shared SimCLR, 3 fine-tunings = 300+300+600 s and
    # 3 x 0.05 + 0.2 + 3 x 0.1 core-hours.
    assert "Sweep total: 20.0 min of stage wall time and 0.6500 CPU core-hours for 7 distinct stages" in md
    assert "the cells' own costs add up to 30.0 min" in md
    assert (sweep / "plots" / "leaderboard_ba_asr.png").stat().st_size > 5000


def drawn(sweep):
    index = json.loads((sweep / "cells.json").read_text())
    rows = group_rows([read_cell(sweep, e, report_columns()) for e in index["cells"]])
    return leaderboard_plots(sweep, rows, ["attack.name"])


def test_failed_cells_are_drawn(sweep):
    """Failed rows are marked in both plots, read back from the figures' artists: a red x
    where the row would be, a hatched placeholder bar; finished rows drawn as before."""
    plots = drawn(sweep)
    ba_asr, cost = plots["ba_asr"], plots["cost"]
    assert sorted(ba_asr["rows"]) == ["badnets (dbd)", "badnets (none)"]
    # wanet: neither its own result nor a finished baseline to place it by -> the bottom middle.
    assert ba_asr["failed"] == ["wanet (dbd)"] and ba_asr["failed_at"] == {"wanet (dbd)": (50.0, 0.0)}
    assert cost["rows"] == ["badnets (none)", "badnets (dbd)"] and cost["failed"] == ["wanet (dbd)"]
    assert ba_asr["path"].stat().st_size > 5000 and cost["path"].stat().st_size > 5000

    # One seed of the badnets defense fails: its row keeps its point (the other seeds) and
    # gets a red x there; the cost plot a placeholder below its bar.
    index = json.loads((sweep / "cells.json").read_text())
    index["cells"][5].update(status="failed", error="RuntimeError: boom")
    (sweep / "cells.json").write_text(json.dumps(index))
    plots = drawn(sweep)
    assert sorted(plots["ba_asr"]["failed"]) == ["badnets (dbd)", "wanet (dbd)"]
    ba, asr = statistics.mean(BA["dbd"][:2]), statistics.mean(ASR["dbd"][:2])
    assert plots["ba_asr"]["failed_at"]["badnets (dbd)"] == pytest.approx((asr, ba))
    assert plots["cost"]["failed"] == ["badnets (dbd)", "wanet (dbd)"]

    # Only failures: still both plots, nothing but the marks.
    for c in index["cells"]:
        c.update(status="failed", error="x")
    (sweep / "cells.json").write_text(json.dumps(index))
    plots = drawn(sweep)
    assert plots["ba_asr"]["rows"] == [] and len(plots["ba_asr"]["failed"]) == 4
    assert plots["cost"]["rows"] == [] and len(plots["cost"]["failed"]) == 4


def test_status_files_are_the_source(sweep):
    """A cell's status.json (what a Slurm array task writes) is merged into cells.json by
    ``dbd leaderboard`` (refresh_index, then the table), unless it was written for other settings of the cell."""
    index = json.loads((sweep / "cells.json").read_text())
    for c in index["cells"]:
        c["config_hash"] = "h-" + c["name"]
    (sweep / "cells.json").write_text(json.dumps(index))
    never_ran = "attack.name-wanet__defense-none__seed-0"
    (sweep / "cells" / never_ran).mkdir(parents=True)
    (sweep / "cells" / never_ran / "status.json").write_text(json.dumps({
        "status": "failed", "error": "ValueError: bad", "traceback": "error.txt", "started": 1.0, "finished": 2.0,
        "seconds": 1.0, "host": "node7", "job": "9_6", "config_hash": "h-" + never_ran}))
    stale = "attack.name-badnets__defense-dbd__seed-0"
    (sweep / "cells" / stale / "status.json").write_text(json.dumps({
        "status": "failed", "error": "old", "config_hash": "an earlier config"}))
    refresh_index(sweep)  # what `dbd leaderboard` does first
    build_leaderboard(sweep, report_columns())
    cells = {c["name"]: c for c in json.loads((sweep / "cells.json").read_text())["cells"]}
    assert cells[never_ran]["status"] == "failed" and cells[never_ran]["error"] == "ValueError: bad"
    assert cells[never_ran]["traceback"] == f"cells/{never_ran}/error.txt" and cells[never_ran]["job"] == "9_6"
    assert cells[stale]["status"] == "done" and cells[stale].get("error") is None
    rows = {(r["attack.name"], r["defense"]): r for r in csv.DictReader((sweep / "leaderboard.csv").open())}
    assert rows[("wanet", "none")]["status"] == "1 failed" and rows[("badnets", "dbd")]["status"] == "done"
    md = (sweep / "leaderboard.md").read_text()
    assert f"- {never_ran}: ValueError: bad (traceback: `cells/{never_ran}/error.txt`)" in md

    # Running with no result: unfinished, listed with where it runs.
    (sweep / "cells" / never_ran / "status.json").write_text(json.dumps({
        "status": "running", "started": 1.0, "host": "node7", "job": "9_6", "config_hash": "h-" + never_ran}))
    refresh_index(sweep)  # what `dbd leaderboard` does first
    build_leaderboard(sweep, report_columns())
    rows = {(r["attack.name"], r["defense"]): r for r in csv.DictReader((sweep / "leaderboard.csv").open())}
    assert rows[("wanet", "none")]["status"] == "1 unfinished"
    md = (sweep / "leaderboard.md").read_text()
    assert "## Unfinished cells" in md and "on node7 Slurm job 9_6" in md

"""``logging.tensorboard``: the event file TensorBoard reads back holds every scalar of
``metrics.jsonl``, one point per step (a resumed step's last write), and only when the
run's config asks for it."""
from __future__ import annotations

import json

import pytest
import yaml

from engine.defenses import report_columns
from engine.report.build import build_report
from tests.report.test_report_build import SPLIT, make_run

pytest.importorskip("tensorboard")

RECORDS = [
    {"time": 1.0, "kind": "step", "stage": "finetune", "epoch": 0, "step": 0, "global_step": 0, "loss": 2.5, "lr": 0.1},
    {"time": 2.0, "kind": "step", "stage": "finetune", "epoch": 0, "step": 1, "global_step": 1, "loss": 2.0, "lr": 0.1},
    # killed after step 1, resumed from the checkpoint at step 0: step 1 replayed, its last write counts
    {"time": 3.0, "kind": "step", "stage": "finetune", "epoch": 0, "step": 1, "global_step": 1, "loss": 1.9, "lr": 0.1},
    {"time": 4.0, "kind": "eval", "stage": "finetune", "epoch": 0, "BA": 96.0, "ASR": 0.5, "RA": 95.0},
    {"time": 5.0, "kind": "stage_done", "stage": "finetune", "resumed": True, "seconds": 12.0},  # no x: not a curve
    SPLIT,
]


def read_back(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_the_event_file_holds_every_scalar_once(tmp_path):
    run = make_run(tmp_path, records=RECORDS)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "logging": {"tensorboard": True}}))
    build_report(run, report_columns())
    got = read_back(run / "tensorboard")
    assert got["finetune/step/loss"] == pytest.approx({0: 2.5, 1: 1.9})
    assert got["finetune/step/lr"] == pytest.approx({0: 0.1, 1: 0.1})
    assert got["finetune/eval/BA"] == pytest.approx({0: 96.0})
    assert got["finetune/split/labelled_poison_share"] == pytest.approx({0: SPLIT["labelled_poison_share"]})
    # Every numeric field of every record with an x, and nothing else.
    want = {f"{r['stage']}/{r['kind']}/{k}" for r in RECORDS if "epoch" in r for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("time", "epoch", "step", "global_step")}
    assert set(got) == want
    # A second report replaces the file instead of adding a second copy of every point.
    build_report(run, report_columns())
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert read_back(run / "tensorboard") == got


def test_off_by_default(tmp_path):
    run = make_run(tmp_path, records=RECORDS)
    build_report(run, report_columns())
    assert not (run / "tensorboard").exists()
    assert json.loads((run / "summary.json").read_text())["finetune"]["BA"] == 96.0

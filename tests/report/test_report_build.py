"""The report on hand-built run directories (no training): the implant flag from the
no-defense baseline, each stage's own time and the defense's total."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from engine.defenses import report_columns
from engine.report.build import build_report

DBD_STAGES = ["supervised", "pretrain", "linear", "finetune"]
# The demo's figures (docs/demo.md), with the WaNet baseline ASR of 3.20.
DONE = {
    "supervised": {"label": "no defense", "defense": "none", "evaluates": True, "seconds": 33.0,
                   "BA": 98.22, "ASR": 3.20, "RA": 90.1},
    "pretrain": {"label": "DBD, SimCLR", "defense": "dbd", "evaluates": False, "seconds": 101.0},
    "linear": {"label": "DBD, linear stage", "defense": "dbd", "evaluates": True, "seconds": 27.0,
               "BA": 95.56, "ASR": 0.49, "RA": 94.58},
    "finetune": {"label": "DBD", "defense": "dbd", "evaluates": True, "seconds": 126.0,
                 "BA": 96.00, "ASR": 0.00, "RA": 96.06},
}
SPLIT = {"kind": "split", "stage": "finetune", "epoch": 0, "labelled": 675, "unlabelled": 672,
         "labelled_poison_share": 0.89, "poisoned_in_labelled": 4.44, "precision": 95.0, "recall": 90.0}
WARNING = "attack did not implant (no-defense ASR 3.20% < 50%): this ASR says nothing about the defense"


def make_run(tmp_path: Path, stages=DBD_STAGES, attack="wanet", done=None, records=(), **attack_keys) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    cfg = {"run_dir": str(run), "stages": list(stages), "data": {"name": "digits"},
           "attack": {"name": attack, "target": 0, "ratio": 0.1, **attack_keys},
           "model": {"arch": "cifar_resnet18", "width": 16}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = done or DONE
    for name in stages:
        (run / name).mkdir()
        (run / name / "done.json").write_text(json.dumps({"stage": name, "world_size": 1, **done[name]}))
    return run


def outputs(run: Path) -> tuple[str, dict, str]:
    table = build_report(run, report_columns())
    return table, json.loads((run / "summary.json").read_text()), (run / "report.md").read_text()


def rows(table: str) -> dict[str, str]:
    """Table row by stage name (the row's first cell ends with "(stage)")."""
    out = {}
    for line in table.splitlines():
        if line.startswith("| ") and "(" in line.split("|")[1]:
            out[line.split("|")[1].strip().rsplit("(", 1)[1].rstrip(")")] = line
    return out


def test_baseline_below_threshold_flags_the_defense_rows(tmp_path):
    table, summary, report = outputs(make_run(tmp_path, records=[SPLIT]))
    assert summary["attack_implanted"] is False
    assert summary["implant_baseline_asr"] == 3.20 and summary["implant_baseline_stage"] == "supervised"
    assert summary["implant_threshold"] == 50.0
    r = rows(table)
    assert list(r) == DBD_STAGES  # the config's order, not the folders' (finetune, linear, ...)
    assert WARNING in r["linear"] and WARNING in r["finetune"]
    assert WARNING not in r["supervised"] and WARNING not in r["pretrain"]
    assert "**The attack did not implant**" in table
    assert table in report and WARNING in report
    # The other keys as before.
    assert summary["finetune"]["BA"] == 96.0 and summary["finetune"]["split"] == [0.89]
    assert summary["finetune"]["split_detail"][0]["labelled"] == 675
    assert summary["supervised"] == {"BA": 98.22, "ASR": 3.2, "RA": 90.1, "split": [], "seconds": 33.0}
    assert "pretrain" not in summary and summary["stages_seconds"]["pretrain"] == 101.0
    assert summary["attack"] == "wanet" and summary["dataset"] == "digits"
    assert r["finetune"].startswith("| DBD (finetune) | 96.00 | 0.00 | 96.06 | 0.89% |")


def test_baseline_above_threshold_no_warning(tmp_path):
    done = {**DONE, "supervised": {**DONE["supervised"], "ASR": 98.77}}
    table, summary, report = outputs(make_run(tmp_path, attack="badnets", done=done))
    assert summary["attack_implanted"] is True and summary["implant_baseline_asr"] == 98.77
    for text in (table, report):
        assert "did not implant" not in text and "says nothing" not in text
    assert "| note |" not in table
    assert "The attack implanted" in table


def test_threshold_from_config(tmp_path):
    done = {**DONE, "supervised": {**DONE["supervised"], "ASR": 60.0}}
    table, summary, report = outputs(make_run(tmp_path, done=done, implant_threshold=70))
    assert summary["attack_implanted"] is False and summary["implant_threshold"] == 70.0
    note = "attack did not implant (no-defense ASR 60.00% < 70%)"
    assert note in rows(table)["finetune"] and note in report
    # The same baseline under the default threshold of 50 implanted.
    (tmp_path / "b").mkdir()
    _, summary, _ = outputs(make_run(tmp_path / "b", done=done))
    assert summary["attack_implanted"] is True and summary["implant_threshold"] == 50.0


def test_without_baseline_says_so_and_names_supervised(tmp_path):
    table, summary, report = outputs(make_run(tmp_path, stages=["pretrain", "linear", "finetune"]))
    assert summary["attack_implanted"] is None and summary["implant_baseline_stage"] is None
    for text in (table, report):
        assert "No no-defense baseline was run" in text and "`supervised`" in text
        assert "did not implant" not in text
    assert list(rows(table)) == ["pretrain", "linear", "finetune"]


def test_clean_run_says_nothing_about_implants(tmp_path):
    table, summary, report = outputs(make_run(tmp_path, attack="none"))
    assert summary["attack_implanted"] is None
    assert "implant" not in table and "baseline" not in table and "implant" not in report


def test_stage_time_is_each_stages_own_and_dbd_total_is_the_sum(tmp_path):
    table, summary, _ = outputs(make_run(tmp_path))
    header = table.splitlines()[0]
    assert "| stage time |" in header and "| time |" not in header
    r = rows(table)
    # Own times from done.json: 33 s, 101 s = 1.7 min, 27 s, 126 s = 2.1 min (not 101 + 27 + 126).
    assert r["supervised"].endswith("| 33 s | - |")
    assert r["pretrain"].startswith("| DBD, SimCLR (pretrain) | - | - | - | - | 1.7 min |")
    assert "| 27 s |" in r["linear"] and "| 2.1 min |" in r["finetune"]
    # 101 + 27 + 126 = 254 s = 4.2 min, under the table.
    assert "DBD total (pretrain + linear + finetune): 4.2 min" in table.split("\n\n", 1)[1]
    assert summary["defense_seconds"] == {"dbd": 254.0}


def test_old_done_files_without_the_new_fields(tmp_path):
    old = {n: {k: v for k, v in d.items() if k not in ("label", "defense", "evaluates")} for n, d in DONE.items()}
    table, summary, _ = outputs(make_run(tmp_path, done=old))
    assert summary["attack_implanted"] is None  # defense unknown: no baseline
    assert set(summary) >= {"supervised", "linear", "finetune"} and "pretrain" not in summary
    assert "| supervised | 98.22 | 3.20 |" in table and "| pretrain | - |" in table
    assert "did not implant" not in table and "total (" not in table


def test_feature_map_panels_follow_the_stages_and_their_labels(tmp_path):
    import numpy as np

    run = make_run(tmp_path)
    rng = np.random.default_rng(0)
    for stage in ("supervised", "pretrain"):
        np.savez(run / stage / "features.npz", features=rng.normal(size=(40, 8)).astype(np.float32),
                 true_labels=np.arange(40) % 10, poisoned=np.arange(40) < 4)
    build_report(run, report_columns())
    assert (run / "plots" / "features_tsne.png").stat().st_size > 1000
    assert "![features_tsne](plots/features_tsne.png)" in (run / "report.md").read_text()

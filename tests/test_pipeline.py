"""The whole pipeline, end to end, on a tiny planted-easy dataset, in real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml


TINY = {
    "stages": ["supervised", "pretrain", "linear", "finetune"],
    "seed": 0,
    "device": "cpu",
    "data": {"name": "cifar10", "num_workers": 1},
    "attack": {"name": "badnets", "target": 0, "ratio": 0.1, "select_from": "all"},
    "model": {"arch": "cifar_resnet18", "width": 4},
    "supervised": {"epochs": 1, "batch_size": 32},
    "pretrain": {"epochs": 1, "schedule_epochs": 10, "batch_size": 64, "sync_bn": False},
    "linear": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "finetune": {"epochs": 2, "iterations_per_epoch": 2, "batch_size": 16, "rampup_epochs": 2},
    "logging": {"progress": False, "log_every": 1},
}


def write_config(tmp_path: Path, root: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(root)
    cfg["run_dir"] = str(tmp_path / "run")
    for k, v in changes.items():
        node = cfg
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def dbd(*args, env=None, timeout=900):
    e = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          env=e, timeout=timeout)


def test_end_to_end_then_rerun_skips_finished(tmp_path, color_root):
    # A SIGKILL in the linear stage and the rerun that resumes it, and a fine-tuning batch
    # the split cannot fill, are in tests/sweep/test_sweep_run.py (the same run code).
    cfg = write_config(tmp_path, color_root)
    run = tmp_path / "run"
    r = dbd("run", cfg, "--stages", "supervised,pretrain")
    assert r.returncode == 0, r.stderr[-3000:]
    r = dbd("run", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[supervised] complete, skipped" in r.stdout and "[pretrain] complete, skipped" in r.stdout

    summary = json.loads((run / "summary.json").read_text())
    for stage in ("supervised", "linear", "finetune"):
        for k in ("BA", "ASR", "RA"):
            assert 0.0 <= summary[stage][k] <= 100.0
    assert summary["supervised"]["split"] == []
    assert len(summary["finetune"]["split"]) == 2
    plan = np.load(run / "poison_plan.npz")
    assert plan["poisoned"].sum() == 20  # 10% of 200, drawn from all samples
    detail = summary["finetune"]["split_detail"][0]
    assert detail["labelled"] == 100 and detail["unlabelled"] == 100  # epsilon 0.5
    assert detail["poisoned_labelled"] == round(detail["labelled_poison_share"] * detail["labelled"] / 100)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in records}
    assert {"step", "epoch", "eval", "split", "stage_done"} <= kinds
    for stage in ("supervised", "pretrain", "linear", "finetune"):
        assert (run / stage / "model.pt").is_file()
    report = (run / "report.md").read_text()
    assert "| no defense (supervised) |" in report and "| DBD (finetune) |" in report
    for png in ("loss.png", "accuracy_asr.png", "split.png", "features_tsne.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["width"] == 4

    # `dbd report` rebuilds the same table from the files alone.
    (run / "report.md").unlink()
    r = dbd("report", run)
    assert r.returncode == 0 and (run / "report.md").is_file() and "| DBD (finetune) |" in r.stdout
    # A rerun of a finished run does no training.
    r = dbd("run", cfg)
    assert r.returncode == 0 and "starting" not in r.stdout


def test_missing_upstream_stage(tmp_path, color_root):
    cfg = write_config(tmp_path, color_root, stages=["linear"])
    r = dbd("run", cfg)
    assert r.returncode == 2
    assert "needs the finished 'pretrain' stage" in r.stderr and "Traceback" not in r.stderr


def test_config_for_another_dataset(tmp_path, color_root, digits_root):
    cfg = write_config(tmp_path, color_root)
    r = dbd("run", cfg, f"data.root={digits_root}")
    assert r.returncode == 2 and "config is for dataset 'cifar10'" in r.stderr
    r = dbd("run", cfg, "attack.target=10")
    assert r.returncode == 2 and "attack.target 10 is outside" in r.stderr
    assert not (tmp_path / "run").exists()

"""The whole benchmark suite in --quick mode, as a user runs it: JSON complete, numbers positive.

Nothing here depends on speed: the figures only have to exist, be finite and positive.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

ENV_KEYS = ("date", "machine", "cpu_model", "cpu_count", "device", "python", "torch", "ffcv", "numpy", "commit")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from benchmarks.suite import select

    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"quick suite failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    # The default run (gpu, the prepared device check, runs only when named: test_gpu_smoke.py).
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in select([])}
    return out, records, proc.stdout


def _positive(value, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value), f"{what}: {value!r} is not a finite number"
    assert value > 0, f"{what}: {value} <= 0"


def _check_stats(stats: dict, what: str) -> None:
    assert stats["reps"], f"{what}: no repetitions"
    for v in stats["reps"]:
        _positive(v, f"{what} repetition")
    for key in ("median", "q1", "q3", "min", "max"):
        _positive(stats[key], f"{what} {key}")
    assert stats["min"] <= stats["median"] <= stats["max"]


def test_every_benchmark_writes_json_and_chart(quick_run):
    out, records, _ = quick_run
    for name, rec in records.items():
        assert rec["benchmark"] == name and rec["quick"] is True
        assert (out / f"{name}.png").stat().st_size > 0
        for key in ENV_KEYS:
            assert rec["environment"].get(key) not in (None, ""), f"{name}: environment.{key} missing"
        assert isinstance(rec.get("settings"), dict) and rec["settings"], f"{name}: no settings"
        _positive(rec["wall_seconds"], f"{name} wall_seconds")


def test_comparisons_are_complete_and_positive(quick_run):
    _, records, _ = quick_run
    compared = [n for n, r in records.items() if r.get("comparisons")]
    assert compared == ["loader"]
    for name in compared:
        rec = records[name]
        # The headline comparison sits at the top level of the JSON.
        for key in ("engine", "reference", "ratio"):
            _positive(rec[key], f"{name}.{key}")
        assert isinstance(rec["unit"], str) and rec["unit"]
        assert rec["ratio"] == pytest.approx(rec["engine"] / rec["reference"])
        for key, c in rec["comparisons"].items():
            what = f"{name}/{key}"
            for field in ("engine", "reference", "ratio"):
                _positive(c[field], f"{what}.{field}")
            _check_stats(c["engine_stats"], f"{what} engine")
            _check_stats(c["reference_stats"], f"{what} reference")


def test_measurements_are_positive(quick_run):
    _, records, _ = quick_run
    for name, rec in records.items():
        for key, m in (rec.get("measurements") or {}).items():
            _positive(m["median"], f"{name}/{key}")
            assert m["reps"], f"{name}/{key}: no repetitions"
            for v in m["reps"]:
                _positive(v, f"{name}/{key} repetition")


def test_benchmark_specific_figures(quick_run):
    _, records, stdout = quick_run
    loader = records["loader"]
    assert "cifar32/simclr/poisoned" in loader["comparisons"] and "cifar32/weak/poisoned" in loader["comparisons"]
    assert loader["measurements"]["imagenet224/deliveries_per_sample"]["median"] == 1.0
    assert {t["name"] for t in loader["targets"]}
    assert set(loader["trigger_by_attack"]["cifar32"]["overhead"]) == {"badnets", "blended", "wanet"}
    assert "trigger/cifar32/wanet/loader_only" in loader["measurements"]
    assert "imagenet224/loader_only/clean" in loader["comparisons"]  # the reference as a side of loader vs decode
    assert "ratio = engine / reference" in stdout


def test_unknown_benchmark_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "no_such_bench", "--quick"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown benchmark 'no_such_bench'" in lines[0] and "loader" in lines[0]


def test_dbd_bench_forwards_to_the_suite(tmp_path):
    from engine.cli import main

    assert main(["bench", "nope"]) == 2
    assert main(["bench", "--list"]) == 0
    assert main(["bench", "--report", str(REPO / "benchmarks" / "recorded" / "2026-11-25_cpu-2vcpu")]) == 0

"""The suite's pieces: statistics, alternation, the table, and the reference pipeline's fidelity."""
from __future__ import annotations

import numpy as np
import pytest
import torch


def test_summarize_keeps_every_repetition():
    from benchmarks.harness import summarize

    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s["reps"] == [4.0, 1.0, 3.0, 2.0]
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0
    assert s["q1"] <= s["median"] <= s["q3"]
    with pytest.raises(ValueError):
        summarize([])


def test_alternate_warms_up_then_reverses_order_every_round():
    from benchmarks.harness import alternate

    calls = []
    out = alternate({"a": lambda r: calls.append(("a", r)) or 1.0, "b": lambda r: calls.append(("b", r)) or 2.0},
                    reps=3, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert out == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}


def test_comparison_ratio_is_engine_over_reference():
    from benchmarks.harness import comparison, target

    c = comparison("images/s", [10.0, 12.0, 11.0], [2.0, 2.0, 2.0])
    assert c["engine"] == 11.0 and c["reference"] == 2.0 and c["ratio"] == 5.5
    assert c["round_ratios"] == [5.0, 6.0, 5.5]
    assert target("x", 0.04, "<=", 0.05)["met"] and not target("y", 3.0, ">=", 20)["met"]


def test_select_rejects_unknown_names():
    from benchmarks.suite import REGISTRY, UnknownBenchmark, select

    # The default run is the comparison suite; the prepared GPU check and the scale table
    # (minutes of writing JPEGs) run only when named.
    assert select([]) == [n for n in REGISTRY if n not in ("gpu", "scale")]
    assert REGISTRY["gpu"].default is False and REGISTRY["scale"].default is False
    assert select(["gpu"]) == ["gpu"]
    assert select(["scale", "loader", "scale"]) == ["scale", "loader"]
    with pytest.raises(UnknownBenchmark, match="unknown benchmark 'nope'"):
        select(["loader", "nope"])


def test_table_lists_comparisons_and_measurements():
    from benchmarks.suite import table

    recs = [{"benchmark": "loader", "headline": "a",
             "comparisons": {"a": {"unit": "images/s", "engine": 2000.0, "reference": 100.0, "ratio": 20.0}}},
            {"benchmark": "flops", "measurements": {"m": {"unit": "GFLOP/image", "median": 1.11}}}]
    text = table(recs)
    assert "a *" in text and "2,000" in text and "20" in text and "1.11" in text


def test_environment_names_the_machine_and_commit():
    from benchmarks.harness import environment

    env = environment()
    assert env["cpu_count"] >= 1 and env["torch"] == torch.__version__
    assert env["commit"] and env["date"]


def test_reference_trigger_matches_the_engine_badnets():
    """Both sides of every poisoned comparison must put the same pixels on the image."""
    from benchmarks.reference import BadNetsTrigger
    from engine.attacks.triggers.badnets import BadNets, build_frame

    engine = BadNets(*build_frame("white3x3", 32, ""))
    rng = np.random.default_rng(0)
    for size in (32, 224):
        images = rng.integers(0, 256, size=(3, size, size, 3), dtype=np.uint8)
        before = images.copy()
        ref = BadNetsTrigger.white3x3(size, size)
        expected = engine.apply(images, np.arange(3))
        got = np.stack([ref(img) for img in images])
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(images, before)  # the dataset's own arrays stay clean


def test_reference_datasets_deliver_views_and_poisoned_labels(tmp_path):
    from PIL import Image

    from benchmarks.reference import (BadNetsTrigger, InMemoryPoisonDataset, JPEGPoisonDataset, simclr_transform,
                                      weak_transform)
    from kernels import SimCLRSpec, WeakSpec

    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    keep = images.copy()
    poisoned = np.array([True, False, False, True])
    ds = InMemoryPoisonDataset(images, [1, 2, 3, 4], poisoned, 0, BadNetsTrigger.white3x3(32, 32),
                               simclr_transform(SimCLRSpec()), views=2)
    v1, v2, label, index = ds[0]
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert (label, index) == (0, 0) and ds[1][2] == 2
    np.testing.assert_array_equal(images, keep)  # the trigger works on a copy
    raw = InMemoryPoisonDataset(images, [1, 2, 3, 4], poisoned, 0, BadNetsTrigger.white3x3(32, 32))
    assert (raw[3][0][-3:, -3:] == 255).all() and raw[3][1] == 0
    x, y, _ = InMemoryPoisonDataset(images, [1, 2, 3, 4], transform=weak_transform(WeakSpec()))[2]
    assert x.shape == (3, 32, 32) and y == 3

    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)).save(path)
    jds = JPEGPoisonDataset([str(path)], [5], [True], 0, BadNetsTrigger.white3x3(224, 224))
    img, label, _ = jds[0]
    assert img.shape == (224, 224, 3) and label == 0 and (img[-21:, -21:] == 255).all()


def test_report_renders_a_results_folder_as_markdown(capsys):
    from benchmarks.harness import REPO
    from benchmarks.suite import main

    assert main(["--report", str(REPO / "benchmarks" / "recorded" / "2026-11-25_cpu-2vcpu")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| benchmark | figure |") and "| loader | cifar32/simclr/poisoned * |" in out


def test_smoke_flag_is_quick(tmp_path, monkeypatch):
    """``--smoke`` reaches a benchmark as quick mode, and the suite hands ``out`` to one that takes it."""
    import argparse

    from benchmarks import suite

    seen = {}

    def fake_suite(names, *, quick, out, **kwargs):
        seen.update(names=names, quick=quick, out=out)
        return [], []

    monkeypatch.setattr(suite, "run_suite", fake_suite)
    p = argparse.ArgumentParser()
    suite.add_arguments(p)
    assert suite.run_from_args(p.parse_args(["gpu", "--smoke", "--out", str(tmp_path), "--device", "cpu"])) == 0
    assert seen == {"names": ["gpu"], "quick": True, "out": tmp_path}


def test_run_in_process_passes_out_to_benchmarks_that_take_it(tmp_path, monkeypatch):
    from benchmarks import gpu, suite

    got = {}
    monkeypatch.setattr(gpu, "run", lambda quick, device=None, out=None: got.update(quick=quick, out=out) or {})
    rec = suite.run_in_process("gpu", quick=True, device="cpu", out=str(tmp_path))
    assert got == {"quick": True, "out": str(tmp_path)} and rec["benchmark"] == "gpu"

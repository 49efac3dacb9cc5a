"""The prepared GPU check (benchmarks/gpu/): its CPU path as CI runs it, and its bookkeeping.

``python -m benchmarks gpu --smoke`` runs with FFCV unimportable in every process it
starts: stub packages first on PYTHONPATH raise ImportError for FFCV and for the other
packages of this venv that a GPU container holding only torch, torchvision and Triton
lacks (DeepSpeed, kornia, fastargs). Every
phase must run its code and report results; what only CUDA can show must say so. The
parent's handling of a failing or killed phase is checked in process with a stand-in
for the phase children.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu

REPO = Path(__file__).resolve().parents[2]
slow = pytest.mark.slow  # the tests of the smoke run: several processes, about 50 s on 2 cores
# Installed in this venv, but not in a GPU image that holds only Python, torch,
# torchvision and Triton: the check must not need them.
BLOCKED = ("ffcv", "deepspeed", "kornia", "fastargs")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-smoke")
    stubs = tmp / "blocked"
    for name in BLOCKED:
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test (the GPU "
                                                  f"container has none)')\n")
    out = tmp / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(stubs), str(REPO),
                                                                    os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # the check sets it for the children that need it
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "gpu", "--smoke", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


@slow
def test_every_phase_ran_without_ffcv(smoke):
    record, _ = smoke
    assert record["benchmark"] == "gpu" and record["mode"] == "smoke"
    assert record["ffcv_importable"] is False
    assert list(record["phases"]) == list(gpu.PHASES)
    for name, ph in record["phases"].items():
        assert ph["status"] == "ok", (name, ph.get("error"), ph.get("skipped"))
        assert ph["results"] and not ph["skipped"], name
        assert ph["ffcv_importable"] is False and ph["ffcv_loaded"] is False, name
        assert 0 < ph["seconds"] <= ph["deadline_s"] + gpu.GRACE_S, name
        # What the CPU cannot show is named, with the reason.
        assert ph["cuda_only"] and all("CUDA" in why for why in ph["cuda_only"].values()), name


@slow
def test_kernels_agree_with_the_twin_under_the_interpreter(smoke):
    ph = smoke[0]["phases"]["kernels"]
    res = ph["results"]
    assert ph["interpreted"] is True and ph["passed"] is True
    (_, _, small), (_, source, large) = gpu.SIZES["smoke"]["kernels"]["small"], gpu.SIZES["smoke"]["kernels"]["large"]
    for size in (f"{small}px", f"{large}px_from_{source}"):
        for dtype in ("fp32", "bf16", "fp16"):
            assert any(k.startswith(f"simclr/{size}/") and k.endswith(f"/{dtype}") for k in res), (size, dtype)
    for kind in ("/strided", "/offsets", "determinism/", "weak_pad_crop/", "weak_resized_crop/", "normalize/"):
        assert any(kind in k for k in res), kind
    for key, r in res.items():
        assert "error" not in r, (key, r.get("traceback"))
        assert r["pass"] is True, (key, r)
        if "max_abs_diff" in r:
            assert 0 <= r["max_abs_diff"] <= r["tolerance"], (key, r)
        if "identical" in r:
            assert r["identical"] is True, key
    offsets = next(r for k, r in res.items() if k.endswith("/offsets"))
    assert offsets["max_abs_diff_last_rows"] <= offsets["tolerance"]


@slow
def test_views_time_every_method(smoke):
    """The fused kernels and the twin a call per batch, torchvision v2 per sample (the
    reference's way); the decode paths and every attack's device twin."""
    ph = smoke[0]["phases"]["views"]
    for label in gpu.SIZES["smoke"]["views"]["sizes"]:
        for method in ("fused", "torch_path", "torchvision_v2"):
            r = ph["results"][f"{label}/{method}"]
            assert r["unit"] == "views/s" and r["median"] > 0 and math.isfinite(r["median"]), (label, method)
        assert ph["ratios"][f"{label}/fused_vs_torchvision_v2"] > 0
    decode = [k for k in ph["results"] if k.startswith("decode/")]
    assert len(decode) == 4 and all(ph["results"][k]["median"] > 0 for k in decode), decode
    size = gpu.SIZES["smoke"]["decode"]["decode_size"]
    for attack in ("badnets", "blended", "sig", "wanet"):
        assert ph["results"][f"trigger_twin/{attack}/{size}px"]["median"] > 0, attack
    assert ph["targets"] == []  # the >= 10x target is a GPU figure: not recorded from the interpreter


@slow
def test_steps_of_the_real_stages(smoke):
    ph = smoke[0]["phases"]["steps"]
    assert ph["bf16_matmul_peak_flops"] > 0
    cases = gpu.SIZES["smoke"]["steps"]["cases"]
    assert len(ph["results"]) == 2 * len(cases)
    for key, r in ph["results"].items():
        assert "error" not in r, (key, r.get("traceback"))
        assert r["images_per_s"] > 0 and r["loss_finite"], key
        assert r["images_per_step"] == r["batch"] * (1 if r["kind"] == "simclr" else 2), key
        assert sum(r["split_share"].values()) == pytest.approx(1.0), key
        assert isinstance(r["host_syncs_per_step"], int) and r["host_syncs_per_step"] == sum(r["host_syncs"].values())
        assert r["flops_per_step"] > 0 and r["bf16_peak_share"] > 0, key  # FLOPs counted on the real step
        assert r["peak_memory_gib"] is None  # a CUDA figure
    assert {r["precision"] for r in ph["results"].values()} == {"bf16", "fp32"}
    assert {(r["family"], r["kind"]) for r in ph["results"].values()} == {
        (f, k) for f in ("cifar", "imagenet") for k in ("simclr", "mixmatch")}
    imagenet = [r for r in ph["results"].values() if r["family"] == "imagenet"]
    assert all(r["source_size"] > r["image_size"] for r in imagenet)  # views cut from larger sources


@slow
def test_every_registered_stage_takes_steps(smoke):
    ph = smoke[0]["phases"]["stages"]
    steps = gpu.SIZES["smoke"]["stages"]["steps"]
    assert ph["stages"] == list(gpu.checked_stages()) and ph["passed"] is True
    for stage in gpu.checked_stages():
        got = ph["results"][stage]
        assert "error" not in got, (stage, got.get("traceback"))
        assert len(got["losses"]) == steps and all(math.isfinite(v) for v in got["losses"]), stage
    assert ph["results"]["finetune"]["labelled"] > 0  # the split ran
    assert "nccl_probe" not in ph["results"] and "nccl" in ph["cuda_only"]  # a CUDA case


@slow
def test_markdown_summarises_every_phase(smoke):
    record, md = smoke
    for name in gpu.PHASES:
        assert f"## {name}" in md and f"| {name} | ok |" in md
    assert "Passed: **yes**" in md and "not measurements" in md
    assert next(iter(record["phases"]["steps"]["results"])) in md


def test_the_modules_it_runs_import_with_ffcv_blocked():
    """With the stages' own blocker (tests/stages/stage_matrix.py) in place before anything
    loads: the gpu check and every benchmark module its phases use."""
    code = ("import sys; from tests.stages.stage_matrix import BlockFFCV; sys.meta_path.insert(0, BlockFFCV()); "
            "import benchmarks.gpu, benchmarks.gpu.kernels_phase, benchmarks.gpu.views_phase, "
            "benchmarks.gpu.steps_phase, benchmarks.gpu.stages_phase, benchmarks.stages, "
            "benchmarks.suite, engine.data.memory, engine.pipeline, engine.runtime.host_sync, kernels; "
            "assert not any(m.split('.')[0] == 'ffcv' for m in sys.modules); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# --------------------------------------------------------------------------- the parent's bookkeeping


def test_a_failing_or_killed_phase_keeps_the_others(tmp_path, monkeypatch):
    """One phase raises, one is killed at its cap after saving part of its work: both are
    recorded with what they had, and the phases around them still run and report."""
    calls = []

    def fake_child(target_fn, kwargs, *, timeout, env=None, **_):
        name = target_fn.split(":")[0].split(".")[-1].removesuffix("_phase")
        calls.append((name, kwargs["deadline"], timeout, env))
        if name == "views":
            raise RuntimeError("benchmarks.gpu.views_phase:run failed (exit status [1]; its output is above)")
        if name == "steps":
            Path(kwargs["progress"]).write_text(json.dumps({"results": {"cifar32/simclr": {"images_per_s": 5.0}},
                                                            "skipped": {}, "cuda_only": {}, "notes": []}))
            raise RuntimeError("benchmarks.gpu.steps_phase:run did not finish within 9 s")
        return {"results": {"case": {"pass": True}}, "skipped": {}, "cuda_only": {}, "notes": []}

    monkeypatch.setattr(gpu.runner, "run_child", fake_child)
    record = gpu.run(quick=True, out=str(tmp_path))
    ph = record["phases"]
    assert [c[0] for c in calls] == list(gpu.PHASES)
    assert ph["kernels"]["status"] == "ok" and ph["stages"]["status"] == "ok"
    assert ph["views"]["status"] == "failed" and "exit status" in ph["views"]["error"]
    assert ph["steps"]["status"] == "timed_out" and ph["steps"]["results"] == {"cifar32/simclr": {"images_per_s": 5.0}}
    # Deadlines are cumulative from the start, by each phase's cap.
    caps = gpu.CAPS["smoke"]
    deadlines = [c[1] for c in calls]
    gaps = [b - a for a, b in zip(deadlines, deadlines[1:])]
    assert gaps == pytest.approx([caps[n] for n in gpu.PHASES[1:]], abs=1e-6)
    assert all(c[3] == {"TRITON_INTERPRET": "1"} for c in calls)  # the smoke children are interpreted
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["phases"]["steps"]["status"] == "timed_out" and saved["phases"]["views"]["status"] == "failed"
    md = (tmp_path / "gpu.md").read_text()
    assert "| views | failed |" in md and "| steps | timed_out |" in md and "exit status" in md


def test_a_phase_records_errors_and_stops_at_its_deadline(tmp_path):
    import time

    p = gpu.Progress(str(tmp_path / "p.json"), deadline=time.time() + 60)
    p.case("a", lambda: {"x": 1})
    p.case("b", lambda: 1 / 0)
    assert p.data["results"]["b"]["error"].startswith("ZeroDivisionError")
    p.case("c", lambda: {"x": 3})  # runs after the failed one
    p.deadline = time.time() - 1
    p.case("d", lambda: {"x": 4})
    assert set(p.data["results"]) == {"a", "b", "c"} and "phase time cap" in p.data["skipped"]["d"]
    assert json.loads((tmp_path / "p.json").read_text())["skipped"] == p.data["skipped"]  # saved as it goes


def test_tolerances_are_the_kernels_tests():
    """One source: the kernels' tests and the GPU check both read kernels/tolerances.py,
    and neither writes a number of its own in its place."""
    import ast

    from benchmarks.gpu import kernels_phase
    from kernels import tolerances

    text = (REPO / "tests" / "kernels" / "test_kernels_triton.py").read_text()
    assert re.search(r"^TOL = tolerances\.simclr_by_dtype\(\)$", text, re.M)
    weak = re.search(r"def test_weak\(.*?atol=([\w.]+)", text, re.S).group(1)
    assert weak == "tolerances.WEAK"
    assert kernels_phase.tolerances is tolerances
    source = (REPO / "benchmarks" / "gpu" / "kernels_phase.py").read_text()
    numbers = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)
               and isinstance(n.value, float) and n.value < 0.1]
    assert numbers == [], numbers  # no tolerance written in the check itself
    assert set(tolerances.SIMCLR) == {"fp32", "fp16", "bf16"} and tolerances.WEAK > 0
    import torch

    assert tolerances.simclr_by_dtype()[torch.bfloat16] == tolerances.SIMCLR["bf16"]


def test_the_full_plan_fits_the_device_limit():
    # The device machine gives a command 10 minutes; the check plans for 8 at most, and
    # the suite's own limit for it sits between the two.
    from benchmarks.suite import REGISTRY

    planned = sum(gpu.CAPS["full"].values()) + gpu.GRACE_S
    assert planned <= 480 < REGISTRY["gpu"].full_limit_s <= 600 - 30

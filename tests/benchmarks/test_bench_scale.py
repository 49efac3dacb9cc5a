"""``python -m benchmarks scale --quick``: the JSON is complete, its figures are positive and
finite, and every entry of the derived scale table equals its formula recomputed here, by
hand, from the recorded repetitions and per-core figures.

Nothing here depends on speed.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Stated independently of benchmarks/scale.py: the training-set sizes and FFCV's per-A100 rates.
TRAIN_IMAGES = {"ImageNet-1k": 1_281_167, "ImageNet-100": 126_689}
GPU_RATES = {"ResNet-18": 10_000.0, "ResNet-50": 3_000.0}
ATTACKS = ("badnets", "blended", "wanet")


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-scale")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "scale", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"scale --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    path = out / "scale.json"
    assert path.is_file(), f"no scale.json in {sorted(p.name for p in out.iterdir())}"
    return out, json.loads(path.read_text())


def _positive(value, what: str) -> None:
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{what}: {value!r} is not a number"
    assert math.isfinite(value) and value > 0, f"{what}: {value!r} is not a positive finite number"


def _close(a: float, b: float, what: str) -> None:
    assert math.isclose(a, b, rel_tol=1e-9), f"{what}: recorded {a!r}, recomputed {b!r}"


def test_runs_only_when_named():
    from benchmarks.suite import REGISTRY, select

    assert REGISTRY["scale"].default is False and "scale" not in select([])
    assert REGISTRY["scale"].full_limit_s == 1200


def test_figures_are_positive_and_finite(scale_run):
    _, rec = scale_run
    assert rec["benchmark"] == "scale" and rec["quick"] is True
    cores = rec["settings"]["cores"]
    m = rec["measurements"]
    expected = ["rss/peak_self_mb", "rss/peak_largest_child_mb"]
    expected += [f"prepare/256/{f}" for f in ("images_per_s", "images_per_s_per_core", "bytes_per_image")]
    expected += [f"loader/os_cache_{oc}/threads{t}/images_per_s{pc}" for oc in ("on", "off")
                 for t in sorted({1, cores}) for pc in ("", "_per_core")]
    expected += [f"attack/{a}/images_per_s{pc}" for a in ("clean", *ATTACKS) for pc in ("", "_per_core")]
    missing = [k for k in expected if k not in m]
    assert not missing, f"measurements missing: {missing}"
    for key, meas in m.items():
        assert meas["reps"], key
        _positive(meas["median"], key)
        for i, v in enumerate(meas["reps"]):
            _positive(v, f"{key} rep {i}")
    for key, v in rec["per_core"].items():
        if key != "slowest_attack":
            _positive(v, f"per_core/{key}")
    assert rec["per_core"]["slowest_attack"] in ATTACKS
    assert isinstance(rec["page_cache_drop"]["worked"], bool)
    assert rec["tree"]["train_images"] > 0 and rec["tree"]["jpeg_quality"] == 90
    assert any("two photos" in n and "linear" in n for n in rec["notes"])


def test_per_core_figures_come_from_the_measurements(scale_run):
    """The table's inputs, recomputed from the raw records: the prepare's counts and
    seconds, the payload bytes, and the loader's repetitions."""
    _, rec = scale_run
    cores, pc = rec["settings"]["cores"], rec["per_core"]
    p = rec["prepare"]
    _close(pc["prepare_images_per_s_per_core"],
           (p["train_images"] + p["val_images"]) / p["seconds"] / p["writer_processes"], "prepare per core")
    assert p["writer_processes"] == min(cores, max(1, p["train_images"] // 2000))
    _close(pc["bytes_per_image"], p["payload_bytes"] / p["train_images"], "bytes per image, 256 px")
    assert p["payload_bytes"] <= p["train_beton_bytes"]
    clean = statistics.median(rec["measurements"][f"loader/os_cache_on/threads{cores}/images_per_s"]["reps"]) / cores
    _close(pc["loader_clean"], clean, "loader per core, clean")
    attack = {a: statistics.median(rec["measurements"][f"attack/{a}/images_per_s"]["reps"]) / cores for a in ATTACKS}
    _close(pc["loader_slowest_attack"], min(attack.values()), "loader per core, slowest attack")
    assert attack[pc["slowest_attack"]] == min(attack.values())


def test_derived_table_equals_its_formulas(scale_run):
    _, rec = scale_run
    pc, derived = rec["per_core"], rec["derived"]
    assert set(derived) == set(TRAIN_IMAGES)
    for ds, n in TRAIN_IMAGES.items():
        row = derived[ds]
        assert row["train_images"] == n
        expected = {"beton_bytes/bytes_per_image": n * pc["bytes_per_image"]}
        for c in (16, 64):
            expected[f"prepare_seconds/{c}_cores"] = n / (pc["prepare_images_per_s_per_core"] * c)
        for model, gpu_rate in GPU_RATES.items():
            expected[f"cores_per_gpu/{model}/loader_clean"] = gpu_rate / pc["loader_clean"]
            expected[f"cores_per_gpu/{model}/loader_slowest_attack"] = gpu_rate / pc["loader_slowest_attack"]
        entries = {k: v for k, v in row.items() if isinstance(v, dict)}
        assert set(entries) == set(expected), f"{ds}: entries {sorted(entries)} vs {sorted(expected)}"
        for key, value in expected.items():
            e = entries[key]
            _close(e["value"], value, f"{ds} {key}")
            _positive(e["value"], f"{ds} {key}")
            assert e["formula"] and "=" in e["derivation"], f"{ds} {key}: no derivation"
        for key in ("beton_bytes/bytes_per_image", "prepare_seconds/16_cores", "prepare_seconds/64_cores"):
            assert f"{n:,}" in entries[key]["derivation"], f"{ds} {key}: {entries[key]['derivation']}"
        for model, gpu_rate in GPU_RATES.items():
            assert f"{gpu_rate:,.0f} img/s" in entries[f"cores_per_gpu/{model}/loader_clean"]["derivation"]


def test_markdown_table(scale_run):
    out, rec = scale_run
    md = rec["table_markdown"]
    lines = md.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| dataset"))
    assert set(lines[header + 1].replace(" ", "")) <= set("|-")
    rows = [line for line in lines[header + 2:] if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows] == list(TRAIN_IMAGES)
    assert all(r.count("|") == lines[header].count("|") for r in rows)
    assert "Derivations:" in md
    written = (out / "scale.md").read_text()
    assert md in written


def test_imagenet_like_maps_each_beton_sample_to_its_jpeg(tmp_path, monkeypatch):
    """The reference reads ``jpeg_paths[i]`` where the engine reads sample i of the prepared
    .beton: each delivered image equals its file's decode-geometry frame (up to the JPEG
    re-encoding), and differs from its neighbour's."""
    import numpy as np
    from PIL import Image
    from benchmarks.loader import engine_loader
    from benchmarks.synthetic import imagenet_like
    from engine.data.decode_geometry import to_decode_geometry

    monkeypatch.setenv("DBD_BENCH_CACHE", str(tmp_path))
    bench = imagenet_like(20)

    def frame(i: int) -> np.ndarray:
        return to_decode_geometry(np.asarray(Image.open(bench.jpeg_paths[i % 20]).convert("RGB")), 256).astype(int)
    for images, labels, indices in engine_loader(bench, 10, 1):
        for image, label, i in zip(images.numpy().astype(int), labels.numpy(), indices.numpy()):
            assert label == bench.labels[i]
            assert np.abs(image - frame(i)).mean() < 8 < np.abs(image - frame(i + 1)).mean()


def test_cifar_like_beton_holds_the_in_memory_images(tmp_path, monkeypatch):
    """The engine reads the same pixels and labels as the reference's in-memory array."""
    from benchmarks.loader import engine_loader
    from benchmarks.synthetic import cifar_like

    monkeypatch.setenv("DBD_BENCH_CACHE", str(tmp_path))
    bench = cifar_like(100)
    for images, labels, indices in engine_loader(bench, 25, 1):
        assert (images.numpy() == bench.images[indices.numpy()]).all()
        assert (labels.numpy() == bench.labels[indices.numpy()]).all()

"""Round trips source -> .beton -> FFCV Loader, in every supported format."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from engine.data.loaders import LoaderSpec, make_loader
from engine.data.prepare import WriterSettings, prepare
from engine.errors import UserError
from tests.builders import tar_folder, write_cifar_folder, write_gtsrb, write_imagefolder


def read_all(root, split, decode_size=32, train=True):
    loader = make_loader(LoaderSpec(root=str(root), split=split, batch_size=16, shuffle=False, drop_last=False,
                                    num_workers=1, decode_size=decode_size, train=train))
    xs, ys, idx = [], [], []
    for x, y, i in loader:
        xs.append(x.clone())
        ys.append(y.clone())
        idx.append(i.clone())
    import torch
    return torch.cat(xs).numpy(), torch.cat(ys).numpy(), torch.cat(idx).numpy()


def test_cifar_folder_round_trip(tmp_path):
    folder, images, labels = write_cifar_folder(tmp_path / "src")
    meta = prepare("cifar10", str(folder), tmp_path / "out", progress=False)
    n_train = 5 * 12
    assert meta["splits"]["train"]["count"] == n_train and meta["splits"]["test"]["count"] == 12
    assert meta["classes"][3] == "cat" and meta["num_classes"] == 10
    x, y, i = read_all(tmp_path / "out", "train")
    np.testing.assert_array_equal(i, np.arange(n_train))
    np.testing.assert_array_equal(x, images[:n_train])  # raw mode: exact pixels
    np.testing.assert_array_equal(y, labels[:n_train])
    x, y, _ = read_all(tmp_path / "out", "test")
    np.testing.assert_array_equal(x, images[n_train:])
    np.testing.assert_array_equal(y, labels[n_train:])


def test_cifar_tarball_matches_folder(tmp_path):
    folder, _, _ = write_cifar_folder(tmp_path / "src")
    tgz = tar_folder(folder, tmp_path / "cifar-10-python.tar.gz")
    a = prepare("cifar10", str(folder), tmp_path / "a", progress=False)
    b = prepare("cifar10", str(tgz), tmp_path / "b", progress=False)
    assert a["content_hash"] == b["content_hash"]
    np.testing.assert_array_equal(read_all(tmp_path / "a", "train")[0], read_all(tmp_path / "b", "train")[0])


def test_gtsrb_round_trip(tmp_path):
    from PIL import Image

    src = write_gtsrb(tmp_path / "gtsrb")
    meta = prepare("gtsrb", str(src), tmp_path / "out", progress=False)
    assert meta["splits"]["train"]["count"] == 12 and meta["splits"]["test"]["count"] == 6
    assert meta["splits"]["train"]["height"] == [32, 32]
    x, y, i = read_all(tmp_path / "out", "train")
    paths = sorted((src / "Final_Training" / "Images").glob("*/*.ppm"))
    expect = np.stack([np.asarray(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR)) for p in paths])
    np.testing.assert_array_equal(x, expect)
    np.testing.assert_array_equal(y, np.repeat(np.arange(3), 4))
    _, yt, _ = read_all(tmp_path / "out", "test")
    np.testing.assert_array_equal(yt, np.arange(6) % 3)


def test_imagefolder_jpeg_round_trip_with_class_subset(tmp_path):
    from PIL import Image

    src = write_imagefolder(tmp_path / "tree")
    classes = tmp_path / "classes.txt"
    classes.write_text("fish\ncat\n")
    meta = prepare("imagefolder", str(src), tmp_path / "out", classes_file=str(classes), progress=False,
                   writer=WriterSettings(decode_size=0))
    assert meta["classes"] == ["fish", "cat"] and meta["writer"]["write_mode"] == "jpg"
    assert meta["fixed_size"] is False and meta["splits"]["train"]["count"] == 6
    # The tree's own sizes are kept (40-90 px crops), not resized.
    assert meta["splits"]["train"]["height"][0] < meta["splits"]["train"]["height"][1]
    x, y, i = read_all(tmp_path / "out", "train", decode_size=32, train=True)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1])  # labels follow the classes file
    paths = [src / "train" / c / f"{k}.jpg" for c in ("fish", "cat") for k in range(3)]
    for img, p in zip(x, paths):
        ref = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        s = min(ref.shape[:2])
        t = (ref.shape[0] - s) // 2
        left = (ref.shape[1] - s) // 2
        ref = np.asarray(Image.fromarray(ref[t:t + s, left:left + s].astype(np.uint8)).resize((32, 32), Image.BOX),
                         np.float32)
        # JPEG re-encoding and a different resampler: close, not equal.
        assert np.abs(img.astype(np.float32) - ref).mean() < 12


def test_imagefolder_at_decode_geometry(tmp_path):
    """`--decode-size 40`: every image stored as its centre square at 40 px by FFCV's own
    crop-and-resize, so the training frame is the stored image; the evaluation frame
    covers the same source region as from source-resolution storage."""
    import io

    import cv2
    from PIL import Image

    from engine.data.decode_geometry import to_decode_geometry

    src = write_imagefolder(tmp_path / "tree")
    meta = prepare("imagefolder", str(src), tmp_path / "d40", progress=False, writer=WriterSettings(decode_size=40))
    prepare("imagefolder", str(src), tmp_path / "full", progress=False, writer=WriterSettings(decode_size=0))
    assert meta["writer"]["decode_size"] == 40 and meta["fixed_size"] is False
    assert meta["splits"]["train"]["height"] == [40, 40] and meta["splits"]["train"]["width"] == [40, 40]
    x, y, _ = read_all(tmp_path / "d40", "train", decode_size=40, train=True)
    paths = sorted((src / "train").glob("*/*.jpg"))
    for img, p in zip(x, paths):
        # The oracle: PIL's decode of the source file, FFCV's centre square and INTER_AREA
        # resize, then the writer's JPEG encode (OpenCV, quality 90) decoded by PIL: equal
        # up to the two decoders' chroma upsampling (FFCV's differs from PIL's by a few
        # levels at colour edges; without the encode in the oracle the mean is 4 levels).
        square = to_decode_geometry(np.asarray(Image.open(p).convert("RGB")), 40)
        ok, blob = cv2.imencode(".jpg", cv2.cvtColor(square, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        want = np.asarray(Image.open(io.BytesIO(blob.tobytes())).convert("RGB"), dtype=np.int16)
        diff = np.abs(img.astype(np.int16) - want)
        assert ok and diff.mean() < 1.5 and diff.max() <= 8
    for train in (True, False):
        stored, _, _ = read_all(tmp_path / "d40", "test", decode_size=40, train=train)
        source, _, _ = read_all(tmp_path / "full", "test", decode_size=40, train=train)
        # Same framing: the two routes differ by where the JPEG encode happens (and, for
        # the evaluation crop, a second resample), never by a shifted or scaled region.
        assert np.abs(stored.astype(np.float32) - source.astype(np.float32)).mean() < 6
    # Mismatched decode sizes would resample the stored square twice: one clear error.
    with pytest.raises(UserError, match="prepared at decode size 40.*data.decode_size=40"):
        read_all(tmp_path / "d40", "train", decode_size=32)
    with pytest.raises(UserError, match="exceeds --max-resolution"):
        prepare("imagefolder", str(src), tmp_path / "bad", progress=False,
                writer=WriterSettings(decode_size=600, max_resolution=512))
    # The geometry is part of the data's identity (stage keys and poison plans use it).
    assert meta["content_hash"] != json.loads((tmp_path / "full" / "meta.json").read_text())["content_hash"]


def test_digits_is_real_and_fixed(digits_root):
    meta = json.loads((digits_root / "meta.json").read_text())
    assert meta["splits"]["train"]["count"] + meta["splits"]["test"]["count"] == 1797
    assert meta["num_classes"] == 10 and meta["fixed_size"]
    x, y, _ = read_all(digits_root, "test")
    assert x.shape[1:] == (32, 32, 3) and (x[..., 0] == x[..., 2]).all()
    assert np.bincount(y).min() > 40  # stratified split keeps every class


def test_existing_output_refused_then_forced(tmp_path):
    folder, _, _ = write_cifar_folder(tmp_path / "src")
    prepare("cifar10", str(folder), tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="already exists"):
        prepare("cifar10", str(folder), tmp_path / "out", progress=False)
    prepare("cifar10", str(folder), tmp_path / "out", force=True, progress=False)


@pytest.mark.parametrize("make_bad, dataset, message", [
    (lambda p: p, "cifar10", "not found"),
    (lambda p: (p.mkdir(), p)[1], "cifar10", "missing data_batch_1"),
    (lambda p: (p.mkdir(), p)[1], "imagefolder", "train/ is missing"),
    (lambda p: (p.mkdir(), p)[1], "gtsrb", "Final_Training/Images is missing"),
])
def test_bad_sources(tmp_path, make_bad, dataset, message):
    src = make_bad(tmp_path / "src")
    with pytest.raises(UserError, match=message):
        prepare(dataset, str(src), tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "train.beton").exists()


def test_empty_class_and_unreadable_image(tmp_path):
    src = write_imagefolder(tmp_path / "tree")
    for f in (src / "train" / "dog").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="is empty"):
        prepare("imagefolder", str(src), tmp_path / "out", progress=False)
    src2 = write_imagefolder(tmp_path / "tree2")
    (src2 / "val" / "cat" / "0.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="unreadable image"):
        prepare("imagefolder", str(src2), tmp_path / "out2", progress=False)
    assert not any((tmp_path / "out2").glob("*.beton")) if (tmp_path / "out2").exists() else True


def test_truncated_cifar_pickle(tmp_path):
    folder, _, _ = write_cifar_folder(tmp_path / "src")
    blob = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(UserError, match="data_batch_2 is unreadable"):
        prepare("cifar10", str(folder), tmp_path / "out", progress=False)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True)


def test_cli_prepare_then_inspect(tmp_path, capsys):
    from engine.cli import main

    folder, _, labels = write_cifar_folder(tmp_path / "src")
    r = run_cli("prepare", "cifar10", "--source", str(folder), "--out", str(tmp_path / "d"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert main(["inspect", str(tmp_path / "d" / "train.beton"), "--json"]) == 0  # in process: 7 s of imports less
    out = json.loads(capsys.readouterr().out)
    assert out["num_samples"] == 60
    expect = np.bincount(labels[:60], minlength=10)
    assert {int(k): v for k, v in out["label_histogram"].items()} == {c: int(n) for c, n in enumerate(expect) if n}
    r = run_cli("inspect", str(tmp_path / "d" / "train.beton"))
    assert "60 samples" in r.stdout and "cat" in r.stdout


def test_prepare_exits_when_pinned_to_one_cpu(tmp_path):
    """numba's TBB layer deadlocked at interpreter exit on one CPU (numba/numba#10556):
    `dbd prepare` wrote everything and never returned. The engine selects numba's OpenMP
    layer (engine/__init__.py); a user's own choice is kept."""
    import os

    folder, _, _ = write_cifar_folder(tmp_path / "src")
    one_cpu = {min(os.sched_getaffinity(0))}
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run([sys.executable, "-m", "engine", "prepare", "cifar10", "--source", str(folder),
                           "--out", str(tmp_path / "d"), "--no-progress"], capture_output=True, text=True,
                          env=env, preexec_fn=lambda: os.sched_setaffinity(0, one_cpu), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "import engine, numba; print(numba.config.THREADING_LAYER)"],
                           capture_output=True, text=True, env={**env, "NUMBA_THREADING_LAYER": "workqueue"})
    assert probe.stdout.strip() == "workqueue"


@pytest.mark.parametrize("cut", [10, 0.5, -7])
def test_inspect_corrupt_beton(tmp_path, digits_root, cut, capsys):
    # The CLI's own entry point in process (a subprocess per case costs 7 s of imports;
    # test_cli_missing_source_one_line_error checks the process boundary).
    from engine.cli import main

    blob = (digits_root / "train.beton").read_bytes()
    bad = tmp_path / "bad.beton"
    bad.write_bytes(blob[:cut] if isinstance(cut, int) and cut > 0
                    else blob[: int(len(blob) * cut)] if isinstance(cut, float) else blob[:cut])
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_missing_source_one_line_error(tmp_path):
    r = run_cli("prepare", "cifar10", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: cifar10 source not found: {tmp_path / 'nope'}"
    r = run_cli("--debug", "prepare", "cifar10", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode != 0 and "Traceback" in r.stderr

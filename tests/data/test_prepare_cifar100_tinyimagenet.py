"""``dbd prepare cifar100`` and ``dbd prepare tinyimagenet``: the real on-disk layouts
(tests.builders) -> .beton, read back through the FFCV loader and compared with the
source decoded independently (numpy from the pickles, PIL from the JPEGs); bad layouts;
the presets load and train a few steps on the prepared fixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data.loaders import LoaderSpec, make_loader
from engine.data.prepare import prepare
from engine.errors import UserError
from tests.builders import TINY_WNIDS, tar_folder, write_cifar100_folder, write_tinyimagenet

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def read_all(root, split, decode_size):
    import torch

    loader = make_loader(LoaderSpec(root=str(root), split=split, batch_size=16, shuffle=False, drop_last=False,
                                    num_workers=1, decode_size=decode_size, train=False))
    xs, ys, idx = [], [], []
    for x, y, i in loader:
        xs.append(x.clone())
        ys.append(y.clone())
        idx.append(i.clone())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy(), torch.cat(idx).numpy()


def run_cli(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


# ----------------------------------------------------------------------------- CIFAR-100

@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    base = tmp_path_factory.mktemp("cifar100")
    folder, splits, fine, coarse = write_cifar100_folder(base / "src")
    meta = prepare("cifar100", str(folder), base / "out", progress=False)
    return base, folder, splits, fine, coarse, meta


def test_cifar100_round_trip_and_coarse_labels(cifar100):
    base, _, splits, fine, coarse, meta = cifar100
    assert meta["name"] == "cifar100" and meta["num_classes"] == 100 and meta["classes"] == fine
    assert meta["fixed_size"] and meta["writer"]["write_mode"] == "raw"
    assert meta["splits"]["train"]["count"] == 200 and meta["splits"]["test"]["count"] == 40
    for split in ("train", "test"):
        images, y_fine, y_coarse = splits[split]
        x, y, i = read_all(base / "out", split, 32)
        np.testing.assert_array_equal(i, np.arange(len(images)))
        np.testing.assert_array_equal(x, images)  # raw: exact pixels
        np.testing.assert_array_equal(y, y_fine)  # the fine labels are the labels
    on_disk = json.loads((base / "out" / "meta.json").read_text())
    assert on_disk["notes"]["coarse_classes"] == coarse
    for split in ("train", "test"):
        assert on_disk["notes"]["coarse_labels"][split] == splits[split][2].tolist()


def test_cifar100_tarball_matches_folder(cifar100, tmp_path):
    base, folder, _, _, _, meta = cifar100
    tgz = tar_folder(folder, tmp_path / "cifar-100-python.tar.gz")
    assert prepare("cifar100", str(tgz), tmp_path / "b", progress=False)["content_hash"] == meta["content_hash"]


def test_cifar100_bad_layouts(tmp_path):
    folder, _, _, _ = write_cifar100_folder(tmp_path / "src")
    (folder / "meta").rename(tmp_path / "meta")
    with pytest.raises(UserError, match="not a CIFAR-100 python folder: missing meta"):
        prepare("cifar100", str(folder), tmp_path / "o1", progress=False)
    (tmp_path / "meta").rename(folder / "meta")
    blob = (folder / "test").read_bytes()
    (folder / "test").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(UserError, match="CIFAR-100 file test is unreadable"):
        prepare("cifar100", str(folder), tmp_path / "o2", progress=False)
    # A folder without the release's files names all that is missing.
    with pytest.raises(UserError, match="missing train, test, meta"):
        prepare("cifar100", str(tmp_path), tmp_path / "o3", progress=False)
    assert not list(tmp_path.glob("o*/*.beton"))


# -------------------------------------------------------------------------- Tiny-ImageNet

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    src = write_tinyimagenet(base / "tiny-imagenet-200", per_class=11)  # _10 sorts before _2 by name
    meta = prepare("tinyimagenet", str(base), base / "out", progress=False)  # the parent folder works too
    return base, src, meta


def pil_rgb(path):
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_tinyimagenet_round_trip(tiny):
    base, src, meta = tiny
    assert meta["name"] == "tinyimagenet" and meta["classes"] == list(TINY_WNIDS)  # wnids.txt order
    assert meta["notes"]["class_names"] == ["thing 0, item 0", "thing 1, item 1", "thing 2, item 2"]
    assert meta["fixed_size"] and meta["writer"]["write_mode"] == "raw"
    assert meta["splits"]["train"]["height"] == [64, 64] and meta["splits"]["train"]["width"] == [64, 64]
    x, y, i = read_all(base / "out", "train", 64)
    assert x.shape == (33, 64, 64, 3)
    np.testing.assert_array_equal(i, np.arange(33))
    np.testing.assert_array_equal(y, np.repeat(np.arange(3), 11))
    # BackdoorBench's order: per wnid, <wnid>_0 .. <wnid>_10 by number; greyscale -> RGB.
    paths = [src / "train" / w / "images" / f"{w}_{k}.JPEG" for w in TINY_WNIDS for k in range(11)]
    np.testing.assert_array_equal(x, np.stack([pil_rgb(p) for p in paths]))  # raw: the decoded JPEG, exactly
    assert (x[0, ..., 0] == x[0, ..., 2]).all() and not (x[1, ..., 0] == x[1, ..., 2]).all()
    x, y, _ = read_all(base / "out", "test", 64)
    rows = [line.split("\t") for line in (src / "val" / "val_annotations.txt").read_text().splitlines()]
    np.testing.assert_array_equal(x, np.stack([pil_rgb(src / "val" / "images" / r[0]) for r in rows]))
    np.testing.assert_array_equal(y, [TINY_WNIDS.index(r[1]) for r in rows])


def _missing_annotations(src):
    (src / "val" / "val_annotations.txt").unlink()
    return "val_annotations.txt is missing"


def _unknown_wnid(src):
    ann = src / "val" / "val_annotations.txt"
    lines = ann.read_text().splitlines()
    lines[2] = lines[2].replace(lines[2].split("\t")[1], "n99999999")
    ann.write_text("\n".join(lines) + "\n")
    return r"val_annotations.txt line 3: class n99999999 is not in .*wnids.txt"


def _stray_train_folder(src):
    (src / "train" / "n11111111" / "images").mkdir(parents=True)
    return r"train folder .*n11111111 is not a class of .*wnids.txt"


def _corrupt_jpeg(src):
    p = src / "train" / TINY_WNIDS[1] / "images" / f"{TINY_WNIDS[1]}_2.JPEG"
    blob = p.read_bytes()
    p.write_bytes(blob[: len(blob) // 2])  # truncated: the header still opens
    return f"unreadable image .*{TINY_WNIDS[1]}_2.JPEG"


def _wrong_size(src):
    from PIL import Image

    Image.new("RGB", (80, 60)).save(src / "val" / "images" / "val_1.JPEG")
    return r"val_1.JPEG is 80x60, not 64x64"


@pytest.mark.parametrize("damage", [_missing_annotations, _unknown_wnid, _stray_train_folder, _corrupt_jpeg,
                                    _wrong_size])
def test_tinyimagenet_bad_layouts(tmp_path, damage):
    src = write_tinyimagenet(tmp_path / "tiny-imagenet-200", per_class=3)
    message = damage(src)
    with pytest.raises(UserError, match=message) as e:
        prepare("tinyimagenet", str(src), tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_bad_layout_is_one_line(tmp_path):
    src = write_tinyimagenet(tmp_path / "tiny-imagenet-200", per_class=2)
    _unknown_wnid(src)
    r = run_cli("prepare", "tinyimagenet", "--source", src, "--out", tmp_path / "out", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: ") and "val_annotations.txt line 3" in r.stderr
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------- presets

PRESETS = sorted(str(p.relative_to(CONFIGS)) for d in ("cifar100", "tinyimagenet")
                 for p in (CONFIGS / d).glob("*.yaml"))


def test_presets_exist_and_load():
    from engine.config import load_config

    assert PRESETS == [f"{d}/{a}_{x}.yaml" for d in ("cifar100", "tinyimagenet")
                       for a in ("badnets", "blended") for x in ("dbd", "none")]
    for rel in PRESETS:
        cfg = load_config(CONFIGS / rel, ["data.root=/data/x"])
        d = rel.split("/")[0]
        assert cfg.data.name == d and cfg.data.root == "/data/x"
        assert cfg.data.image_size == (64 if d == "tinyimagenet" else 32)
        assert cfg.model.arch == "cifar_resnet18" and cfg.attack.target == 0
        assert tuple(cfg.stages) == (("pretrain", "linear", "finetune") if "_dbd" in rel else ("supervised",))
    assert load_config(CONFIGS / "cifar100/badnets_dbd.yaml").data.mean == (0.5071, 0.4865, 0.4409)
    assert load_config(CONFIGS / "tinyimagenet/blended_none.yaml").data.std == (0.2302, 0.2265, 0.2262)


TINY_RUN = ["device=cpu", "model.width=4", "data.num_workers=1", "logging.progress=false",
            "logging.feature_map=false"]


def _trained(run_dir: Path) -> dict[str, int]:
    """Steps per finished stage, from the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["stage"]: r["epochs"] * r["steps_per_epoch"] for r in rows if r.get("kind") == "stage_done"}


@pytest.mark.slow  # end to end: a `python -m engine run` process, three stages
def test_tinyimagenet_dbd_preset_trains(tiny, tmp_path):
    base, _, _ = tiny
    run = tmp_path / "run"
    r = run_cli("run", CONFIGS / "tinyimagenet/badnets_dbd.yaml", f"data.root={base / 'out'}", f"run_dir={run}",
                *TINY_RUN, "attack.ratio=0.3",
                "pretrain.epochs=1", "pretrain.schedule_epochs=10", "pretrain.batch_size=8",
                "pretrain.iterations_per_epoch=1", "linear.epochs=1", "linear.batch_size=8",
                "linear.iterations_per_epoch=1", "finetune.epochs=1", "finetune.iterations_per_epoch=1",
                "finetune.batch_size=4", "finetune.rampup_epochs=1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _trained(run) == {"pretrain": 1, "linear": 1, "finetune": 1}


@pytest.mark.slow  # end to end: a `python -m engine run` process
def test_cifar100_none_preset_trains(cifar100, tmp_path):
    base = cifar100[0]
    run = tmp_path / "run"
    r = run_cli("run", CONFIGS / "cifar100/blended_none.yaml", f"data.root={base / 'out'}", f"run_dir={run}",
                *TINY_RUN, "attack.blended.pattern=noise", "supervised.epochs=1", "supervised.batch_size=16",
                "supervised.iterations_per_epoch=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _trained(run) == {"supervised": 2}

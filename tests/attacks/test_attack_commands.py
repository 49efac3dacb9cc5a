"""build_poison's plan handling, the poisoned test set, and the three attack commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
from tests.attacks.attack_helpers import make_cfg, source_image, write_lc_cache

from engine.attacks.plan import PLAN_FILE, SUMMARY_FILE, PoisonPlan
from engine.attacks.runtime import build_poison
from engine.cli import main as dbd
from engine.errors import UserError


def meta_of(root):
    return json.loads((root / "meta.json").read_text())


def write_config(path, root, name="badnets", run_dir=None, **attack):
    meta = meta_of(root)
    lines = [f"data:\n  name: {meta['name']}\n  root: {root}\n", f"attack:\n  name: {name}\n"]
    lines += [f"  {k}: {v}\n" for k, v in attack.items()]
    if run_dir is not None:
        lines.insert(0, f"run_dir: {run_dir}\n")
    path.write_text("".join(lines))
    return path


def one_line_error(capsys, argv) -> str:
    assert dbd(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- runtime


def test_plan_is_saved_then_reused_by_other_ranks(digits_root, tmp_path):
    cfg = make_cfg(digits_root, "wanet", run_dir=tmp_path)
    first = build_poison(cfg, meta_of(digits_root), tmp_path)  # rank 0: draws and saves
    assert (tmp_path / PLAN_FILE).is_file()
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["poisoned"] == int(first.plan.poisoned.sum()) and summary["noise"] == int(first.plan.noise.sum())
    stamp = (tmp_path / PLAN_FILE).stat().st_mtime_ns
    other = build_poison(cfg, meta_of(digits_root), tmp_path)  # another rank: loads
    assert (tmp_path / PLAN_FILE).stat().st_mtime_ns == stamp
    for name in ("poisoned", "labels", "noise"):
        assert np.array_equal(getattr(first.plan, name), getattr(other.plan, name))


def test_a_plan_for_another_dataset_is_refused(digits_root, jpeg_root, tmp_path):
    build_poison(make_cfg(digits_root, "badnets", run_dir=tmp_path), meta_of(digits_root), tmp_path)
    with pytest.raises(UserError, match="another dataset") as e:
        build_poison(make_cfg(jpeg_root, "badnets", "attack.target=1", run_dir=tmp_path), meta_of(jpeg_root), tmp_path)
    assert "\n" not in str(e.value)


def test_changed_attack_settings_are_refused_on_reuse(digits_root, tmp_path):
    build_poison(make_cfg(digits_root, "badnets", run_dir=tmp_path), meta_of(digits_root), tmp_path)
    with pytest.raises(UserError, match="pattern"):
        build_poison(make_cfg(digits_root, "badnets", "attack.badnets.pattern=dbd2x2", run_dir=tmp_path),
                     meta_of(digits_root), tmp_path)


def test_invalid_trigger_leaves_no_plan_behind(digits_root, tmp_path):
    cfg = make_cfg(digits_root, "blended", f"attack.blended.pattern={tmp_path / 'nope.png'}", run_dir=tmp_path)
    with pytest.raises(UserError, match="pattern file not found"):
        build_poison(cfg, meta_of(digits_root), tmp_path)
    assert not (tmp_path / PLAN_FILE).exists()


def test_poisoned_test_set_excludes_the_target_and_keeps_labels(digits_root):
    rt = build_poison(make_cfg(digits_root, "badnets", "attack.target=7"), meta_of(digits_root), None)
    idx = rt.poisoned_test_indices
    assert not (rt.test_labels[idx] == 7).any()
    assert len(idx) == int((rt.test_labels != 7).sum())
    none = build_poison(make_cfg(digits_root, "none"), meta_of(digits_root), None)
    assert len(none.poisoned_test_indices) == 0 and none.train_ops() is None and none.test_ops() is None
    assert not none.plan.poisoned.any()


@pytest.mark.parametrize("overrides, message", [
    (["attack.target=10"], "outside the class range"),
    (["attack.badnets.pattern_size=256", "attack.badnets.pattern=white3x3"], "vanishes"),
])
def test_build_poison_bad_input(digits_root, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        build_poison(make_cfg(digits_root, "badnets", *overrides), meta_of(digits_root), None)
    assert "\n" not in str(e.value)


def test_label_consistent_without_cache_says_to_run_attack_prepare(digits_root, tmp_path):
    rt = build_poison(make_cfg(digits_root, "label_consistent", run_dir=tmp_path), meta_of(digits_root), tmp_path)
    assert rt.test_ops() is not None  # the test-time trigger needs no cache
    with pytest.raises(UserError, match="dbd attack-prepare"):
        rt.train_ops()


# --------------------------------------------------------------------------- commands


def test_cli_bad_input_is_one_line(digits_root, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", digits_root)
    assert "alpha" in one_line_error(capsys, ["preview", str(cfg), "attack.name=blended",
                                              "attack.blended.alpha=1.5", "--out", str(tmp_path / "x.png")])
    assert "ratio" in one_line_error(capsys, ["export-poisoned", str(cfg), "attack.ratio=0", "--split", "train",
                                              "--out", str(tmp_path / "x.npz")])
    assert "not found" in one_line_error(capsys, ["preview", str(cfg), f"attack.badnets.pattern={tmp_path}/a.png",
                                                  "--out", str(tmp_path / "x.png")])
    big = tmp_path / "big.npz"
    np.savez(big, pattern=np.full((33, 33, 3), 255, np.uint8))
    assert "larger than the image" in one_line_error(capsys, ["preview", str(cfg), f"attack.badnets.pattern={big}",
                                                              "--out", str(tmp_path / "x.png")])
    assert "outside the class range" in one_line_error(capsys, ["preview", str(cfg), "attack.target=10",
                                                                "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("which", ["digits", "jpeg"])
def test_preview_writes_a_grid(digits_root, jpeg_root, tmp_path, capsys, which):
    from PIL import Image

    root = digits_root if which == "digits" else jpeg_root
    extra = {} if which == "digits" else {"target": 1, "ratio": 0.5}
    cfg = write_config(tmp_path / "c.yaml", root, "wanet", run_dir=tmp_path / "run", **extra)
    out = tmp_path / "grid.png"
    split = "train" if which == "digits" else "test"
    assert dbd(["preview", str(cfg), "--out", str(out), "--split", split, "--count", "4"]) == 0
    with Image.open(out) as im:
        assert im.size[0] > 300 and im.size[1] > 300
    assert not (tmp_path / "run").exists()  # preview writes nothing into the run dir


def test_export_train_is_what_the_loader_delivers(digits_root, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_root, "badnets", ratio=0.2)
    out = tmp_path / "train.npz"
    assert dbd(["export-poisoned", str(cfg), "--split", "train", "--limit", "300", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["images"].shape == (300, 32, 32, 3) and z["images"].dtype == np.uint8
    assert np.array_equal(z["indices"], np.arange(300))
    rt = build_poison(make_cfg(digits_root, "badnets", "attack.ratio=0.2"), meta_of(digits_root), None)
    assert np.array_equal(z["poisoned"], rt.plan.poisoned[:300]) and z["poisoned"].any()
    assert np.array_equal(z["labels"], rt.plan.labels[:300])
    assert np.array_equal(z["true_labels"], rt.plan.true_labels[:300])
    for k in (0, int(np.flatnonzero(z["poisoned"])[0])):
        src = source_image(digits_root, "train", k)
        want = rt.test_attack().apply(src[None], np.array([k]))[0] if z["poisoned"][k] else src
        assert np.array_equal(z["images"][k], want)
    assert str(z["attack"]) == "badnets" and int(z["target"]) == 3


def test_export_test_is_the_poisoned_test_set(digits_root, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_root, "sig")
    out = tmp_path / "test.npz"
    assert dbd(["export-poisoned", str(cfg), "--split", "test", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["poisoned"].all() and not (z["labels"] == 3).any()
    assert np.array_equal(z["labels"], z["true_labels"])


def _checkpoint(path, num_classes=10, width=4):
    import torch

    from engine.models import Classifier

    torch.manual_seed(0)
    torch.save(Classifier("cifar_resnet18", width, num_classes).state_dict(), path)
    return path


def test_attack_prepare_with_a_given_model_then_training_uses_the_cache(digits_root, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", digits_root, "label_consistent", run_dir=run,
                       ratio=0.5, clean_label_ratio_of="class")
    ckpt = _checkpoint(tmp_path / "model.pt")
    args = [str(cfg), "model.width=4", f"attack.label_consistent.model={ckpt}", "attack.label_consistent.steps=2",
            "attack.label_consistent.batch_size=256"]
    assert dbd(["attack-prepare", *args]) == 0
    deltas = np.load(run / "lc_perturbations.npy")
    side = json.loads((run / "lc_perturbations.json").read_text())
    labels = build_poison(make_cfg(digits_root, "none"), meta_of(digits_root), None).plan.true_labels
    assert side["indices"] == np.flatnonzero(labels == 3).tolist()
    assert deltas.dtype == np.int8 and deltas.shape == (len(side["indices"]), 32, 32, 3)
    assert np.abs(deltas).max() <= 8 and np.abs(deltas).max() > 0
    capsys.readouterr()
    assert dbd(["attack-prepare", *args]) == 0 and "up to date" in capsys.readouterr().out
    out = tmp_path / "lc.npz"
    assert dbd(["export-poisoned", *args, "--split", "train", "--poisoned-only", "--limit", "5",
                "--out", str(out)]) == 0
    z = np.load(out)
    for img, k in zip(z["images"], z["indices"]):
        src = source_image(digits_root, "train", int(k)).astype(int)
        d = deltas[side["indices"].index(int(k))].astype(int)
        inner = (slice(3, 29), slice(3, 29))
        assert np.array_equal(img.astype(int)[inner], np.clip(src + d, 0, 255)[inner])
    one_line_error(capsys, ["attack-prepare", str(cfg), "model.width=8", f"attack.label_consistent.model={ckpt}"])


def test_attack_prepare_trains_its_own_classifier(digits_root, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", digits_root, "label_consistent", run_dir=tmp_path / "run",
                       ratio=0.5, clean_label_ratio_of="class")
    assert dbd(["attack-prepare", str(cfg), "model.width=4", "attack.label_consistent.surrogate=short",
                "attack.label_consistent.train_epochs=1", "attack.label_consistent.steps=1",
                "attack.label_consistent.batch_size=512"]) == 0
    source = json.loads((tmp_path / "run" / "lc_perturbations.json").read_text())["model"]
    assert source.startswith("trained here") and "short recipe, 1 epochs, lr 0.05" in source


def test_surrogate_recipes():
    """The default is BackdoorBench's clean training (shared/reference/attacks.md: 100
    epochs, SGD lr 0.01, cosine); "short" is the named small-machine recipe."""
    from engine.attacks.triggers.label_consistent import LabelConsistentConfig

    reference = LabelConsistentConfig().surrogate_recipe()
    assert (reference.epochs, reference.lr) == (100, 0.01)
    short = LabelConsistentConfig(surrogate="short").surrogate_recipe()
    assert (short.epochs, short.lr) == (5, 0.05)
    custom = LabelConsistentConfig(surrogate="short", train_epochs=2, train_lr=0.1).surrogate_recipe()
    assert (custom.epochs, custom.lr) == (2, 0.1)
    with pytest.raises(UserError, match="attack.label_consistent.surrogate"):
        LabelConsistentConfig(surrogate="long").validate()


def test_lc_cache_is_checked_against_the_plan(digits_root, tmp_path):
    cfg = make_cfg(digits_root, "label_consistent", "attack.ratio=0.5", "attack.clean_label_ratio_of=class",
                   run_dir=tmp_path)
    rt = build_poison(cfg, meta_of(digits_root), tmp_path)
    write_lc_cache(rt, tmp_path)
    side = tmp_path / "lc_perturbations.json"
    info = json.loads(side.read_text())
    side.write_text(json.dumps({**info, "content_hash": "0" * 64}))
    with pytest.raises(UserError, match="another dataset"):
        build_poison(cfg, meta_of(digits_root), tmp_path).train_ops()
    side.write_text(json.dumps({**info, "indices": info["indices"][:-1]}))
    with pytest.raises(UserError, match="shape"):
        build_poison(cfg, meta_of(digits_root), tmp_path).train_ops()
    assert isinstance(PoisonPlan.load(tmp_path / PLAN_FILE), PoisonPlan)

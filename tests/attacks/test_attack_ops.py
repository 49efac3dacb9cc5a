"""The FFCV operations through real Loaders, pixel for pixel against the NumPy references:
fixed-size raw data (digits), JPEG ImageFolder data, and variable-size raw data."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tests.attacks.attack_helpers import (PREPARED_FIXTURES, attack_names, epoch, expected_frame, load, make_cfg,
                                         source_image, tiny_settings, write_prepared_inputs)

from engine.attacks.runtime import build_poison

ATTACKS = attack_names()  # every registered attack, with its own tiny_overrides()


def runtime_for(root, name, run_dir, *extra):
    cfg = make_cfg(root, name, *tiny_settings(name), *extra, run_dir=run_dir)
    meta = json.loads((root / "meta.json").read_text())
    # The plan comes first (it names the target class), then the prepared inputs for it.
    write_prepared_inputs(name, cfg, meta, run_dir)
    return build_poison(cfg, meta, run_dir)


def test_every_attack_that_needs_preparing_has_a_test_fixture():
    from engine.attacks import ATTACKS
    from engine.attacks.base import Attack

    prepared = {n for n, a in ATTACKS.items() if a.prepare.__func__ is not Attack.prepare.__func__}
    assert prepared == set(PREPARED_FIXTURES), "add the attack's stand-in to tests/attacks/attack_helpers.py"


def check_against_reference(root, split, runtime, images, labels, indices, *, fixed, decode_size, train):
    attack = runtime.train_attack() if split == "train" else runtime.test_attack()
    selected = runtime.train_selected if split == "train" else np.ones(len(runtime.test_labels), bool)
    for img, index in zip(images, indices):
        want = expected_frame(root, split, int(index), attack, bool(selected[index]), fixed=fixed,
                              decode_size=decode_size, train=train)
        assert np.array_equal(img, want), f"{runtime.name} {split} sample {index}: " \
                                          f"max diff {np.abs(img.astype(int) - want).max()}"
    if split == "train":
        assert np.array_equal(labels, runtime.plan.labels[indices])
    else:
        assert np.array_equal(labels, runtime.test_labels[indices])


# --------------------------------------------------------------------------- fixed-size raw


@pytest.fixture(scope="module", params=ATTACKS)
def digits_runtime(request, digits_root, tmp_path_factory):
    return runtime_for(digits_root, request.param, tmp_path_factory.mktemp(request.param))


def test_raw_train_loader_matches_reference_every_epoch(digits_root, digits_runtime):
    rt = digits_runtime
    loader = load(digits_root, "train", rt.train_ops(), shuffle=True, batch_size=128, seed=1)
    first = epoch(loader)
    second = epoch(loader)
    images, labels, indices = first
    assert sorted(indices.tolist()) == list(range(len(rt.plan.labels)))
    # Batches mix triggered and clean samples.
    sel = rt.train_selected[indices[:128]]
    assert sel.any() and not sel.all()
    check_against_reference(digits_root, "train", rt, images, labels, indices, fixed=True, decode_size=32,
                            train=True)
    # Another epoch, another order, the same pixels for every sample.
    assert not np.array_equal(second[2], indices)
    order = np.argsort(second[2])
    assert np.array_equal(second[0][order], images[np.argsort(indices)])
    assert np.array_equal(second[1][order], labels[np.argsort(indices)])
    if type(rt.train_attack()).clean_label:
        assert np.array_equal(labels, rt.plan.true_labels[indices])
    if rt.name == "badnets":
        # The loader's own output at the DBD reference trigger's 12 values (cifar_1.png).
        poisoned = images[rt.train_selected[indices]]
        want = {(4, 4): (180, 249, 112), (4, 5): (155, 50, 126), (5, 4): (234, 82, 68), (5, 5): (187, 201, 219)}
        for (r, c), rgb in want.items():
            assert (poisoned[:, r, c] == np.array(rgb, np.uint8)).all()


def test_raw_poisoned_test_set(digits_root, digits_runtime):
    rt = digits_runtime
    idx = rt.poisoned_test_indices
    assert len(idx) == int((rt.test_labels != rt.target).sum()) and len(idx) > 0
    images, labels, got = epoch(load(digits_root, "test", rt.test_ops(), indices=idx, batch_size=100))
    assert np.array_equal(got, idx)
    assert not (labels == rt.target).any()
    check_against_reference(digits_root, "test", rt, images, labels, got, fixed=True, decode_size=32, train=False)


def test_wanet_noise_is_the_same_on_every_rank_and_thread_count(digits_root, tmp_path):
    rt = runtime_for(digits_root, "wanet", tmp_path)
    seen = {}
    for rank in (0, 1):
        from engine.data.loaders import LoaderSpec, make_loader

        loader = make_loader(LoaderSpec(root=str(digits_root), split="train", batch_size=100, shuffle=True,
                                        drop_last=False, seed=4, rank=rank, world_size=2, num_workers=1),
                             poison=rt.train_ops())
        images, _, indices = epoch(loader)
        for img, i in zip(images, indices):
            seen.setdefault(int(i), []).append(img)
    noisy = [i for i in seen if rt.plan.noise[i]]
    assert noisy
    attack = rt.train_attack()
    for i in noisy[:40]:
        want = attack.apply(source_image(digits_root, "train", i)[None], np.array([i]))[0]
        assert all(np.array_equal(img, want) for img in seen[i])


def test_ops_refuse_a_dataset_of_another_length(digits_root, digits_runtime):
    from engine.errors import UserError

    with pytest.raises(UserError, match="not interchangeable"):
        load(digits_root, "test", digits_runtime.train_ops())


# --------------------------------------------------------------------------- JPEG


# Every attack on source-resolution JPEGs; a patch and a warp on JPEGs stored at the
# decode geometry (48 px squares, `dbd prepare --decode-size 48`).
@pytest.mark.parametrize("name,stored", [(a, "jpeg_root") for a in ATTACKS]
                         + [("badnets", "jpeg48_root"), ("wanet", "jpeg48_root")])
def test_jpeg_decoder_matches_reference(request, tmp_path, name, stored):
    """Either way the trigger is drawn on the 48 px frame after the crop and resize."""
    jpeg_root = request.getfixturevalue(stored)
    extra = ["data.decode_size=48", "attack.target=1"]
    if name in ("badnets", "blended", "wanet"):
        extra.append("attack.ratio=0.5")  # 4 of the 8 non-target training photos
    if name == "wanet":
        extra.append("attack.wanet.cross_ratio=1")  # 4 noise-mode photos, 4 left clean
    rt = runtime_for(jpeg_root, name, tmp_path, *extra)
    # Eval framing (224/256 centre crop) once per operation kind: the attacks whose
    # training trigger differs (WaNet noise, label-consistent perturbations) and BadNets.
    modes = (("train", True), ("test", False)) if name in ("badnets", "wanet", "label_consistent") \
        else (("train", True),)
    for split, train in modes:
        ops = rt.train_ops() if train else rt.test_ops()
        indices = None if train else rt.poisoned_test_indices
        images, labels, got = epoch(load(jpeg_root, split, ops, indices=indices, batch_size=5, decode_size=48,
                                         train=train))
        assert images.shape[1:] == (48, 48, 3)
        if train:
            sel = rt.train_selected[got]
            assert sel.any() and not sel.all()
        check_against_reference(jpeg_root, split, rt, images, labels, got, fixed=False, decode_size=48, train=train)


# --------------------------------------------------------------------------- variable-size raw


def test_variable_size_raw_source_is_never_written(raw_var_root, tmp_path):
    path = raw_var_root / "train.beton"
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    rt = runtime_for(raw_var_root, "badnets", tmp_path, "data.decode_size=40", "attack.ratio=0.5", "attack.target=1")
    images, labels, got = epoch(load(raw_var_root, "train", rt.train_ops(), batch_size=4, decode_size=40))
    check_against_reference(raw_var_root, "train", rt, images, labels, got, fixed=False, decode_size=40, train=True)
    # A clean pass over the same mapping afterwards still sees the original pixels.
    clean, _, got = epoch(load(raw_var_root, "train", None, batch_size=4, decode_size=40))
    for img, i in zip(clean, got):
        want = expected_frame(raw_var_root, "train", int(i), None, False, fixed=False, decode_size=40, train=True)
        assert np.array_equal(img, want)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before

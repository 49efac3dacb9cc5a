"""The device twins (engine/attacks/device.py) on CPU tensors, pixel for pixel against the
NumPy references (``Attack.apply``) and against the FFCV loader's triggered output on
fixed-size raw data (digits), for every attack's training and test variants."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.attacks.attack_helpers import attack_names, epoch, load, make_cfg, tiny_settings, write_prepared_inputs

from engine.attacks.device import TWINS, device_twin
from engine.attacks.runtime import build_poison
from engine.errors import UserError

ATTACKS = attack_names()  # every registered attack, with its own tiny_overrides()


@pytest.fixture(scope="module", params=ATTACKS)
def runtime(request, digits_root, tmp_path_factory):
    name = request.param
    run_dir = tmp_path_factory.mktemp(f"twin-{name}")
    cfg = make_cfg(digits_root, name, *tiny_settings(name), run_dir=run_dir)
    meta = json.loads((digits_root / "meta.json").read_text())
    write_prepared_inputs(name, cfg, meta, run_dir)
    return build_poison(cfg, meta, run_dir)


def test_every_attack_has_a_twin():
    from engine.attacks import ATTACKS as REGISTERED

    assert set(TWINS) == set(REGISTERED)


@pytest.mark.parametrize("split", ["train", "test"])
def test_twin_equals_the_ffcv_loader_and_the_reference(digits_root, runtime, split):
    if split == "train":
        attack, selected, ops = runtime.train_attack(), runtime.train_selected, runtime.train_ops()
    else:
        attack, selected, ops = runtime.test_attack(), np.ones(len(runtime.test_labels), bool), runtime.test_ops()
    clean, _, idx = epoch(load(digits_root, split, batch_size=128))
    poisoned, _, idx_p = epoch(load(digits_root, split, ops, batch_size=128))
    assert np.array_equal(idx, idx_p)
    if split == "train" and runtime.name == "wanet":
        assert runtime.plan.noise.any()  # the per-sample noise grids are exercised
    twin = device_twin(attack)
    got = twin.apply_selected(torch.from_numpy(clean.copy()), torch.from_numpy(idx),
                              torch.from_numpy(np.asarray(selected, bool))).numpy()
    assert np.array_equal(got, poisoned), f"{runtime.name} {split}: max diff {np.abs(got.astype(int) - poisoned).max()}"
    sel = np.asarray(selected, bool)[idx]
    assert sel.any()
    want = attack.apply(clean[sel], idx[sel])
    assert np.array_equal(twin(torch.from_numpy(clean[sel]), torch.from_numpy(idx[sel])).numpy(), want)
    assert np.array_equal(got[~sel], clean[~sel])  # unselected samples untouched


@pytest.mark.parametrize("size", [(32, 32), (45, 37), (13, 20)])
def test_twin_on_other_windows(runtime, size):
    """Windows of another size than the frame go through the same nearest-neighbour maps."""
    rng = np.random.default_rng(size[0])
    for attack in (runtime.train_attack(), runtime.test_attack()):
        n = len(runtime.plan.true_labels)
        idx = np.sort(rng.choice(n, 16, replace=False))
        if attack.name == "label_consistent" and attack.rows is not None:
            idx[:8] = np.flatnonzero(attack.rows >= 0)[:8]  # samples with a perturbation
        if attack.name == "wanet" and attack.noise is not None:
            idx[:8] = np.flatnonzero(attack.noise)[:8]  # samples with a noise grid
        images = rng.integers(0, 256, size=(len(idx), *size, 3), dtype=np.uint8)
        got = device_twin(attack)(torch.from_numpy(images), torch.from_numpy(idx)).numpy()
        assert np.array_equal(got, attack.apply(images, idx)), (attack.name, size)


def test_an_attack_without_a_twin_is_a_user_error():
    from engine.attacks.triggers.badnets import BadNets

    class Other(BadNets):  # not registered (no ``name`` of its own in TWINS)
        pass

    other = Other(np.zeros((4, 4, 3), np.uint8), np.ones((4, 4, 3), bool))
    other.name = "other_attack"
    with pytest.raises(UserError, match="no device twin"):
        device_twin(other)


def test_bad_batches():
    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig

    twin = device_twin(BadNets.from_config(BadNetsConfig()))
    with pytest.raises(ValueError, match="uint8 NHWC"):
        twin(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.arange(2))
    empty = torch.zeros(0, 8, 8, 3, dtype=torch.uint8)
    assert twin(empty, torch.zeros(0, dtype=torch.int64)).shape == empty.shape

"""``data.trigger_device: device`` (engine/data/device_trigger.py) against the default,
where the loader draws the trigger: the run's loaders (training in its shuffled order, a
subset of it, the poisoned test set; the scoring and feature loaders take the same code
path) deliver the same images, labels and indices, on fixed-size raw data (digits) and
on JPEG data stored at a decode geometry. The loader's own trigger is the oracle; it is
held against the NumPy references in test_attack_ops.py, and every attack's twin
against it in test_device_twins.py, so here the attacks are those with per-sample state
(WaNet's noise grids, label-consistent's perturbations) and the plain patch on JPEG data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tests.attacks.attack_helpers import epoch, make_cfg, tiny_settings, write_prepared_inputs

from engine.attacks.runtime import build_poison
from engine.data.run_data import DatasetMeta, RunData
from engine.runtime.launch import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="test")


def _run_data(root, name, run_dir, place: str, *extra: str) -> RunData:
    cfg = make_cfg(root, name, *tiny_settings(name), "data.num_workers=1", f"data.trigger_device={place}", *extra,
                   run_dir=run_dir)
    meta = json.loads((root / "meta.json").read_text())
    if place == "loader":  # the first of the two: prepared inputs shared by both
        write_prepared_inputs(name, cfg, meta, run_dir)
    return RunData(cfg.data, DatasetMeta.from_raw(meta), CPU, cfg.seed, build_poison(cfg, meta, run_dir))


def _batches(data: RunData) -> dict[str, tuple[np.ndarray, ...]]:
    n = data.meta.train_count
    subset = np.arange(0, n, 3)
    train = data.train_loader(4)  # the JPEG fixture has 12 training images
    out = {"train epoch 2": _collect(RunData.epoch(train, 2))}
    data.set_subset(train, subset)
    out["train subset"] = _collect(RunData.epoch(train, 0))
    out["poisoned test"] = epoch(data.test_loader(data.poison.poisoned_test_indices, poisoned=True))
    return out


def _collect(batches) -> tuple[np.ndarray, ...]:
    parts = list(zip(*[(x.numpy().copy(), y.numpy().copy(), i.numpy().copy()) for x, y, i in batches]))
    return tuple(np.concatenate(p) for p in parts)


@pytest.mark.parametrize("name", ["wanet", "label_consistent"])
def test_device_trigger_equals_the_loader_trigger_on_raw_data(digits_root, tmp_path, name):
    _check(digits_root, tmp_path, name)


@pytest.mark.parametrize("name", ["badnets", "wanet"])
def test_device_trigger_equals_the_loader_trigger_on_jpeg_data(jpeg48_root, tmp_path, name):
    _check(jpeg48_root, tmp_path, name, "attack.target=0", "attack.ratio=0.3", "data.decode_size=48",
           "data.image_size=32")


def _check(root, tmp_path, name, *extra):
    loader_side = _batches(_run_data(root, name, tmp_path, "loader", *extra))
    device_side = _batches(_run_data(root, name, tmp_path, "device", *extra))
    triggered = 0
    for what, (x, y, i) in loader_side.items():
        dx, dy, di = device_side[what]
        assert np.array_equal(i, di) and np.array_equal(y, dy), f"{name} {what}: order or labels differ"
        assert np.array_equal(x, dx), f"{name} {what}: {int((x != dx).any(axis=(1, 2, 3)).sum())} images differ"
        triggered += int(len(i))
    assert triggered


def test_clean_data_has_nothing_to_move(digits_root, tmp_path):
    """attack none with the trigger on the device: plain FFCV loaders."""
    cfg = make_cfg(digits_root, "none", "data.trigger_device=device", run_dir=tmp_path)
    meta = json.loads((digits_root / "meta.json").read_text())
    data = RunData(cfg.data, DatasetMeta.from_raw(meta), CPU, cfg.seed, None)
    assert type(data.train_loader(8)).__name__ == "Loader"


def test_bad_trigger_device_is_one_config_error():
    from engine.config import load_config
    from engine.errors import UserError

    with pytest.raises(UserError, match="data.trigger_device"):
        load_config(None, ["data.trigger_device=gpu"])

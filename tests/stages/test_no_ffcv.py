"""Without FFCV: the layers under the loaders import, and every stage trains on in-memory data.

A child process blocks FFCV from import before anything else loads
(tests/stages/stage_matrix.py), imports every module of ``kernels``, ``engine.models``,
``engine.losses``, ``engine.runtime`` and ``engine.stages``, and trains each stage for
two steps through ``engine.data.memory``. Then, in process, the in-memory loader itself.
"""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

from engine.data.order import shard_order
from engine.errors import UserError
from tests.runtime.helpers import check, run
from tests.stages.stage_matrix import PACKAGES, stage_names

STAGES = stage_names()


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    out = tmp_path_factory.mktemp("no-ffcv") / "result.json"
    check(run([sys.executable, "-m", "tests.stages.stage_matrix", "imports", out], timeout=300))
    return json.loads(out.read_text())


def test_ffcv_was_blocked(child):
    assert child["ffcv_blocked"]


def test_the_block_stays_in_the_child():
    # Importing the driver for its constants must not block FFCV for this test session.
    from tests.stages.stage_matrix import BlockFFCV

    assert not any(isinstance(f, BlockFFCV) for f in sys.meta_path)


def test_every_module_imports_without_ffcv(child):
    imports = child["imports"]
    failed = {k: v for k, v in imports.items() if v != "ok"}
    assert not failed, failed
    for pkg in PACKAGES:
        assert sum(k.startswith(pkg + ".") for k in imports) >= 2, (pkg, sorted(imports))
    from engine.stages import STAGES as REGISTERED

    assert {REGISTERED[s].__module__ for s in STAGES} <= set(imports)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_trains_on_in_memory_tensors_without_ffcv(child, stage):
    got = child["runs"][f"ddp/{stage}"]
    assert "error" not in got, got.get("traceback")
    assert len(got["losses"]) == 2 and all(math.isfinite(v) for v in got["losses"])
    assert got["trainable"] > 0 and got["changed"] == got["trainable"]
    assert not got["imported_ffcv"]


# --------------------------------------------------------------------------- the in-memory loader


def _data(world_size: int = 1, rank: int = 0, n: int = 20):
    from engine.config import load_config
    from engine.data.memory import MemoryData
    from engine.runtime.launch import DistInfo

    cfg = load_config(None, ["data.image_size=8"])
    dist = DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"), pg_backend=None,
                    launcher="test")
    images = torch.arange(n * 8 * 8 * 3, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 8, 8, 3)
    labels = torch.arange(n) % 5
    return MemoryData(cfg.data, dist, seed=3, train=(images, labels), test=(images[:6], labels[:6]), num_classes=5)


def test_memory_loader_follows_the_sharded_epoch_order():
    for rank in (0, 1):
        data = _data(world_size=2, rank=rank)
        loader = data.train_loader(4, indices=np.arange(2, 17), stream="s")
        batches = list(data.epoch(loader, 5))
        want = shard_order(np.arange(2, 17), seed=loader.seed, epoch=5, shuffle=True, rank=rank, world_size=2)
        assert len(loader) == len(batches) == len(want) // 4  # drop_last, like the training loaders
        got = torch.cat([idx for _, _, idx in batches]).numpy()
        np.testing.assert_array_equal(got, want[:len(got)])
        for images, labels, idx in batches:
            assert images.dtype == torch.uint8 and images.shape == (4, 8, 8, 3)
            assert torch.equal(images, data.images[idx]) and torch.equal(labels, data.labels[idx])
    # Another epoch, another order; the same epoch, the same one.
    first = [idx.tolist() for _, _, idx in data.epoch(loader, 5)]
    assert first == [idx.tolist() for _, _, idx in data.epoch(loader, 5)]
    assert first != [idx.tolist() for _, _, idx in data.epoch(loader, 6)]


def test_memory_loader_subsets_and_evaluation_loaders():
    data = _data()
    loader = data.train_loader(4)
    data.set_subset(loader, [1, 3, 5, 7, 9, 11, 13, 15])
    assert sorted(torch.cat([i for _, _, i in data.epoch(loader, 0)]).tolist()) == [1, 3, 5, 7, 9, 11, 13, 15]
    test = data.test_loader(np.arange(6), poisoned=False)
    assert len(test) == 1 and [i.tolist() for _, _, i in test] == [list(range(6))]  # in order, last batch kept
    assert data.meta.train_count == 20 and data.meta.num_classes == 5
    np.testing.assert_array_equal(data.train_labels(), np.arange(20) % 5)
    assert not data.poisoned_mask().any()
    with pytest.raises(UserError, match="indices outside"):
        data.set_subset(loader, [0, 20])
    with pytest.raises(UserError, match="empty index subset"):
        data.set_subset(loader, [])


def test_memory_data_refuses_what_the_stages_cannot_use():
    from engine.config import load_config
    from engine.data.memory import MemoryData
    from engine.runtime.launch import DistInfo

    cfg = load_config(None, ["data.image_size=8"])
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="test")
    ok = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    cases = [((ok.float(), torch.zeros(4)), "must be uint8 \\(N, H, W, 3\\)"),
             ((torch.zeros(4, 16, 16, 3, dtype=torch.uint8), torch.zeros(4)), "16x16 but data.image_size is 8"),
             ((ok, torch.zeros(3)), "4 images but 3 labels"),
             ((ok, torch.full((4,), 7)), "labels must lie in \\[0, 5\\)")]
    for train, message in cases:
        with pytest.raises(UserError, match=message):
            MemoryData(cfg.data, dist, 0, train=train, test=(ok, torch.zeros(4)), num_classes=5)

"""The stage store's links and lock, in process (the sweep tests run it end to end)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from engine.config import load_config, to_dict
from engine.errors import UserError
from engine.runtime.launch import DistInfo
from engine.stages.store import StageStore

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="single")


def test_links_relink_and_lock(tmp_path):
    cfg = to_dict(load_config(None))
    store = StageStore(tmp_path / "store", cfg, dataset_hash="h", world_size=1)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    with store.attach("pretrain", run_a, SINGLE) as complete:
        assert not complete
        link = run_a / "pretrain"
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        assert link.resolve() == store.entry("pretrain").resolve()
        assert (store.entry("pretrain") / "key.json").is_file()
        # A second job for the same entry while it trains: one clear error, at once.
        with pytest.raises(UserError, match="being trained by another job right now"):
            with store.attach("pretrain", run_b, SINGLE):
                pass
    (store.entry("pretrain") / "done.json").write_text("{}")
    with store.attach("pretrain", run_b, SINGLE) as complete:  # the lock is free again: reused
        assert complete and (run_b / "pretrain").resolve() == (run_a / "pretrain").resolve()

    # The run's inputs change: its link moves to the new entry; the old entry stays.
    changed = copy.deepcopy(cfg)
    changed["pretrain"]["epochs"] += 1
    other = StageStore(tmp_path / "store", changed, dataset_hash="h", world_size=1)
    with other.attach("pretrain", run_a, SINGLE) as complete:
        assert not complete and (run_a / "pretrain").resolve() == other.entry("pretrain").resolve()
    assert other.entry("pretrain") != store.entry("pretrain") and (store.entry("pretrain") / "done.json").is_file()

    # A stage folder made without a store is used as it is.
    (tmp_path / "c" / "linear").mkdir(parents=True)
    with store.attach("linear", tmp_path / "c", SINGLE):
        assert not (tmp_path / "c" / "linear").is_symlink()

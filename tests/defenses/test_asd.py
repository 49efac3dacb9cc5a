"""ASD (engine/defenses/asd/): the pool schedule, the rules against NumPy, the seeds, the
meta-split's virtual model, 1 against 2 real (gloo) processes, and a killed run resumed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.defenses.asd.meta import virtual_update
from engine.defenses.asd.pools import class_aware_pool, lowest_share, oracle_seeds, per_class_at, trusted_seeds
from engine.errors import UserError
from tests.gloo import run_ranks


# --------------------------------------------------------------------------- the rules

def _pool_at(epoch: int, losses, labels, seeds, c) -> np.ndarray:
    """The size-determining part of ``ASD.draw_pool``: the rule of the epoch on a record."""
    if epoch < c.class_aware_until:
        return class_aware_pool(losses, labels, seeds, per_class_at(epoch, c.growth, c.growth_every), 10)
    return lowest_share(losses, c.epsilon)


def test_pool_sizes_follow_the_reference_schedule():
    c = load_config(None, []).asd
    n = 5000
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 10
    poisoned = rng.random(n) < 0.1
    seeds = oracle_seeds(poisoned, labels, c.seeds_per_class, 10, rng)
    sizes = [len(_pool_at(e, rng.random(n), labels, seeds, c)) for e in range(c.meta_from)]
    # 100 seeds; 10 more per class every 5 epochs: 100 at epochs 0-4, 200 at 5-9, ..., 1,200 at 55-59.
    assert sizes[:60] == [100 * (1 + e // 5) for e in range(60)]
    assert sizes[55] == 1200 and set(sizes[60:]) == {n // 2}


def test_class_aware_pool_is_the_seeds_plus_the_lowest_per_given_label():
    rng = np.random.default_rng(1)
    n, classes = 300, 3
    losses, labels = rng.random(n), rng.integers(0, classes, n)
    seeds = np.array([0, 1, 2, 50])
    pool = class_aware_pool(losses, labels, seeds, 7, classes)
    want = set(seeds.tolist())
    for c in range(classes):  # the oracle: a NumPy argsort per label, seeds left out
        idx = np.array([i for i in np.argsort(losses, kind="stable") if labels[i] == c and i not in seeds])
        want |= set(idx[:7].tolist())
    assert set(pool.tolist()) == want and len(pool) == len(want) == 4 + 21
    assert np.all(np.diff(pool) > 0)


def test_lowest_share_is_the_numpy_argsort():
    scores = np.random.default_rng(2).random(101)
    np.testing.assert_array_equal(lowest_share(scores, 0.5), np.sort(np.argsort(scores, kind="stable")[:50]))


def test_oracle_seeds_are_clean_and_balanced():
    labels = np.arange(200) % 4
    poisoned = np.zeros(200, bool)
    poisoned[::3] = True
    seeds = oracle_seeds(poisoned, labels, 5, 4, np.random.default_rng(0))
    assert len(seeds) == 20 and not poisoned[seeds].any()
    assert np.bincount(labels[seeds]).tolist() == [5, 5, 5, 5]
    with pytest.raises(UserError, match="fewer than"):
        oracle_seeds(poisoned, labels, 40, 4, np.random.default_rng(0))


def test_trusted_seeds_from_a_file(tmp_path):
    (tmp_path / "s.txt").write_text("4, 2\n9\n")
    np.testing.assert_array_equal(trusted_seeds(str(tmp_path / "s.txt"), 10), [2, 4, 9])
    np.save(tmp_path / "s.npy", np.array([3, 1]))
    np.testing.assert_array_equal(trusted_seeds(str(tmp_path / "s.npy"), 10), [1, 3])
    with pytest.raises(UserError, match=r"in \[0, 5\)"):
        trusted_seeds(str(tmp_path / "s.txt"), 5)
    with pytest.raises(UserError, match="not a file"):
        trusted_seeds(str(tmp_path / "missing.txt"), 5)


def test_bad_settings_are_one_clear_error():
    with pytest.raises(UserError, match="asd.meta_from"):
        load_config(None, ["asd.class_aware_until=80", "asd.meta_from=70"])
    with pytest.raises(UserError, match="asd.meta_bn"):
        load_config(None, ["asd.meta_bn=eval"])


# --------------------------------------------------------------------------- the meta-split

@pytest.mark.parametrize("bn", ["train", "frozen_below"])
def test_the_virtual_update_leaves_the_real_model_and_the_frozen_layers(bn):
    from engine.models import Classifier
    from engine.runtime.launch import DistInfo
    from engine.runtime.precision import Precision

    torch.manual_seed(0)
    model = Classifier("cifar_resnet18", 4, 10).train()
    real = {k: v.clone() for k, v in model.state_dict().items()}
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="test")
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(3)]
    prefixes = ("backbone.layer3", "backbone.layer4", "classifier")
    virtual = virtual_update(model, batches, dist, Precision("fp32"), prefixes=prefixes, lr=0.015, bn=bn)
    for k, v in model.state_dict().items():  # the real model: not one tensor moved
        assert torch.equal(v, real[k]), k
    after = virtual.state_dict()
    params = {n for n, _ in virtual.named_parameters()}
    for k in params:
        moved = not torch.equal(after[k], real[k])
        assert moved == k.startswith(prefixes), k  # stem, layer1, layer2: untouched; the rest stepped
    stats = [k for k in after if k.endswith("running_mean") and not k.startswith(prefixes)]
    assert stats
    # The reference's train-mode copy moves the statistics of the frozen layers too.
    assert any(not torch.equal(after[k], real[k]) for k in stats) == (bn == "train")


# --------------------------------------------------------------------------- the stage on real data

@pytest.fixture(scope="module")
def color_root(tmp_path_factory) -> Path:
    from tests.builders import prepared_color_cifar

    return prepared_color_cifar(tmp_path_factory.mktemp("asd-colors"), n_per_batch=40)


def _stage(root: Path, run_dir: Path, rank: int = 0, world: int = 1):
    from engine.pipeline import make_stage
    from tests.gloo import rank_data

    cfg = load_config(None, [f"data.root={root}", "data.name=cifar10", "data.num_workers=1", "attack.target=0",
                             "attack.ratio=0.1", "attack.select_from=all", f"run_dir={run_dir}", "model.width=4",
                             "stages=[asd]", "asd.batch_size=8", "asd.seeds_per_class=2", "asd.meta_batch_size=16",
                             "asd.growth_every=1", "asd.class_aware_until=2", "asd.meta_from=3",
                             "logging.progress=false"])
    data = rank_data(cfg, run_dir, rank, world)
    stage = make_stage(cfg, "asd", run_dir=Path(run_dir), dist=data.dist, data=data)
    torch.manual_seed(cfg.seed)
    stage.build()
    return stage


def _pools(stage) -> dict[int, np.ndarray]:
    return {e: stage.draw_pool(e, stage.backend.module) for e in (1, 2, 3)}  # class-aware, agnostic, meta


def test_the_stage_draws_each_rule_and_keeps_the_real_model(color_root, tmp_path):
    stage = _stage(color_root, tmp_path)
    before = {k: v.clone() for k, v in stage.backend.module.state_dict().items()}
    pools = _pools(stage)
    n = len(stage.labels)
    assert len(pools[1]) == len(stage.seeds) + 10 * 10 and set(stage.seeds) <= set(pools[1])
    assert len(pools[2]) == len(pools[3]) == n // 2
    assert not stage.poisoned[stage.seeds].any()
    for k, v in stage.backend.module.state_dict().items():
        assert torch.equal(v, before[k]), k


def _worker(rank, world, root, run_dir, out):
    pools = _pools(_stage(Path(root), Path(run_dir), rank, world))
    if rank == 0:
        np.savez(out, **{str(e): p for e, p in pools.items()})


def test_pools_identical_in_one_and_two_processes(color_root, tmp_path):
    single = _pools(_stage(color_root, tmp_path / "one"))
    out = tmp_path / "two.npz"
    (tmp_path / "two").mkdir()
    _stage(color_root, tmp_path / "two")  # the poison plan is drawn once; both ranks load it
    run_ranks(_worker, 2, str(color_root), str(tmp_path / "two"), str(out))
    two = np.load(out)
    # The records are world-size invariant, so the loss-ranked pools are equal.
    for e in (1, 2):
        np.testing.assert_array_equal(two[str(e)], single[e])
    # The meta-split's virtual epoch trains like any DDP model: BatchNorm sees each rank's
    # share of a batch and each rank draws its own views, so its pool depends on the world
    # size as training does (engine/defenses/asd/README.md); here it must only run.
    assert len(two["3"]) == len(single[3])


# --------------------------------------------------------------------------- a killed run resumed

def _pool_records(run_dir: Path) -> dict[int, tuple]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "asd_pool":
            out[rec["epoch"]] = (rec["rule"], rec["labelled"], rec["poisoned_labelled"])
    return out


def test_killed_in_the_class_aware_rule_then_resumed_draws_the_same_pools(color_root, tmp_path):
    from tests.runtime.helpers import killed_and_resumed, max_weight_diff

    changes = {"stages": ["asd"], "data": {"name": "cifar10", "root": str(color_root), "num_workers": 1},
               "attack": {"name": "badnets", "target": 0, "ratio": 0.1, "select_from": "all",
                          "badnets": {"pattern": "white3x3"}},
               "asd": {"epochs": 4, "iterations_per_epoch": 3, "batch_size": 16, "seeds_per_class": 2,
                       "growth": 5, "growth_every": 1, "class_aware_until": 3, "meta_from": 3,
                       "meta_batch_size": 32}}
    # 3 steps an epoch, a checkpoint every 2: the kill before global step 5 leaves the one
    # after step 4, inside epoch 1 (class-aware: 2 seeds + 5 per class).
    killed_and_resumed(tmp_path, color_root, "5:0:kill", **changes)
    got, want = _pool_records(tmp_path / "run-killed"), _pool_records(tmp_path / "run-whole")
    assert sorted(want) == [0, 1, 2, 3] and want[3][0] == "meta"
    assert [want[e][1] for e in (0, 1, 2)] == [20, 70, 120]  # the growth did not restart at the resume
    assert got == want
    a, b = (torch.load(tmp_path / f"run-{n}" / "asd" / "model.pt", weights_only=True) for n in ("whole", "killed"))
    assert max_weight_diff(a, b) < 1e-6

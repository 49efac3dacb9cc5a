"""The split on a planted easy case, through the real loader, trigger and views,
in one process and in two real (gloo) processes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.defenses.dbd.split import Split, rank_batches, select_lowest
from tests.builders import PALETTE, prepared_color_cifar
from tests.gloo import rank_data, run_ranks


class PaletteOracle(nn.Module):
    """Planted model: classifies a colour-class image by its mean colour, which pad-crop
    views, flips and a 3x3 trigger barely move. It knows the true classes, so a
    poisoned sample (relabelled to the target) must have a high loss."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3))
        self.register_buffer("std", torch.tensor(std).view(1, 3))
        self.register_buffer("palette", torch.tensor(PALETTE, dtype=torch.float32) / 255)

    def forward(self, x):
        rgb = x.float().mean(dim=(2, 3)) * self.std + self.mean
        return -torch.cdist(rgb, self.palette) * 50


def make_data(root: Path, run_dir: Path, rank: int = 0, world: int = 1):
    """The run's data object for a finetune split test, as the pipeline builds it."""
    cfg = load_config(None, [f"data.root={root}", "data.name=cifar10", "data.num_workers=1", "attack.target=0",
                             "attack.ratio=0.1", "attack.select_from=non_target", f"run_dir={run_dir}"])
    return cfg, rank_data(cfg, run_dir, rank, world)


def split_once(root: Path, run_dir: Path, rank: int = 0, world: int = 1):
    from engine.runtime.precision import Precision
    from engine.defenses.dbd.split import compute_split
    from engine.stages.views import WeakAugment

    cfg, data = make_data(root, run_dir, rank, world)
    model = PaletteOracle(cfg.data.mean, cfg.data.std)
    augment = WeakAugment(cfg.data, cfg.finetune.view)
    return data, compute_split(data, Precision(cfg.precision), model, augment, epoch=3, epsilon=0.5, alpha=0.1,
                               beta=1.0)


@pytest.fixture(scope="module")
def color_root(tmp_path_factory) -> Path:
    return prepared_color_cifar(tmp_path_factory.mktemp("colors"), n_per_batch=60)


def test_planted_split_finds_every_poisoned_sample(color_root, tmp_path):
    data, split = split_once(color_root, tmp_path)
    poisoned = data.poison.plan.poisoned
    n_p = int(poisoned.sum())  # the reference's Bernoulli draw over non-target samples
    assert 10 < n_p < 50 and not (data.poison.plan.true_labels[poisoned] == 0).any()
    assert len(split.labelled) == 150
    q = split.quality(poisoned)
    assert q["poisoned_labelled"] == 0 and q["recall"] == 100.0
    # Exactly the lowest-loss half, by the per-sample losses it reports.
    order = np.lexsort((np.arange(300), split.losses))
    np.testing.assert_array_equal(split.labelled, np.sort(order[:150]))
    # Poisoned samples are the highest losses of all.
    assert set(np.flatnonzero(poisoned)) == set(order[-n_p:])


def _worker(rank, world, root, run_dir, out):
    _, split = split_once(Path(root), Path(run_dir), rank, world)
    if rank == 0:
        np.savez(out, labelled=split.labelled, losses=split.losses)


def test_split_identical_in_one_and_two_processes(color_root, tmp_path):
    _, single = split_once(color_root, tmp_path / "one")
    out = tmp_path / "two.npz"
    (tmp_path / "two").mkdir()
    # The plan file is drawn once; both ranks load it (as the pipeline arranges).
    make_data(color_root, tmp_path / "two")
    run_ranks(_worker, 2, str(color_root), str(tmp_path / "two"), str(out))
    two = np.load(out)
    np.testing.assert_array_equal(two["labelled"], single.labelled)
    np.testing.assert_allclose(two["losses"], single.losses, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- selection and sharding


def test_split_selects_exactly_the_lowest_fraction():
    rng = np.random.default_rng(0)
    losses = rng.random(1001)
    losses[17] = losses[18]  # a tie: the lower index wins
    lab, unl = select_lowest(losses, 0.5)
    assert len(lab) == 500 and len(unl) == 501
    assert set(lab) | set(unl) == set(range(1001)) and not set(lab) & set(unl)
    assert losses[lab].max() <= losses[unl].min()
    np.testing.assert_array_equal(lab, np.sort(np.argsort(losses, kind="stable")[:500]))
    poisoned = np.zeros(1001, bool)
    poisoned[unl[:50]] = True
    poisoned[lab[:5]] = True
    q = Split(lab, unl, losses).quality(poisoned)
    assert q["poisoned_labelled"] == 5 and q["labelled_poison_share"] == pytest.approx(1.0)
    assert q["poisoned_in_labelled"] == pytest.approx(100 * 5 / 55)
    assert q["precision"] == pytest.approx(100 * 50 / 501) and q["recall"] == pytest.approx(100 * 50 / 55)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_split_batches_cover_each_sample_once(world):
    n = 1000
    seen = np.concatenate([rank_batches(n, r, world, batch=64)[0] for r in range(world)])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    ks = sorted(k for r in range(world) for k in rank_batches(n, r, world, batch=64)[1])
    assert ks == list(range(16))

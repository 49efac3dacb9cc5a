"""The split on a planted easy case, through the real loader, trigger and views,
in one process and in two real (gloo) processes."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from engine.config import load_config
from engine.data.prepare import prepare
from tests.builders import PALETTE, write_color_cifar


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


def make_ctx(root: Path, run_dir: Path, rank: int = 0, world: int = 1):
    from engine.attacks.runtime import build_poison
    from engine.data.prepare import load_meta
    from engine.report.metrics import MetricsWriter
    from engine.runtime.launch import DistInfo
    from engine.stages.context import StageContext

    cfg = load_config(None, [f"data.root={root}", "data.name=cifar10", "data.num_workers=1", "attack.target=0",
                             "attack.ratio=0.1", "attack.select_from=non_target", f"run_dir={run_dir}"])
    meta = load_meta(root)
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"),
                    backend="gloo" if world > 1 else None, launcher="test")
    poison = build_poison(cfg, meta, run_dir)
    return StageContext(cfg=cfg, name="finetune", run_dir=run_dir, dist=dist, meta=meta, poison=poison,
                        metrics=MetricsWriter(run_dir / "m.jsonl", enabled=False))


def split_once(root: Path, run_dir: Path, rank: int = 0, world: int = 1):
    from engine.stages.split import compute_split
    from engine.stages.views import WeakAugment

    ctx = make_ctx(root, run_dir, rank, world)
    model = PaletteOracle(ctx.cfg.data.mean, ctx.cfg.data.std)
    augment = WeakAugment(ctx.cfg, ctx.cfg.finetune.view)
    return ctx, compute_split(ctx, model, augment, epoch=3, epsilon=0.5, alpha=0.1, beta=1.0)


@pytest.fixture(scope="module")
def color_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("colors")
    folder = write_color_cifar(base / "src", n_per_batch=60)
    prepare("cifar10", str(folder), base / "beton", progress=False)
    return base / "beton"


def test_planted_split_finds_every_poisoned_sample(color_root, tmp_path):
    ctx, split = split_once(color_root, tmp_path)
    poisoned = ctx.poison.plan.poisoned
    n_p = int(poisoned.sum())  # the reference's Bernoulli draw over non-target samples
    assert 10 < n_p < 50 and not (ctx.poison.plan.true_labels[poisoned] == 0).any()
    assert len(split.labelled) == 150
    q = split.quality(poisoned)
    assert q["poisoned_labelled"] == 0 and q["recall"] == 100.0
    # Exactly the lowest-loss half, by the per-sample losses it reports.
    order = np.lexsort((np.arange(300), split.losses))
    np.testing.assert_array_equal(split.labelled, np.sort(order[:150]))
    # Poisoned samples are the highest losses of all.
    assert set(np.flatnonzero(poisoned)) == set(order[-n_p:])


def _worker(rank, world, port, root, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _, split = split_once(Path(root), Path(run_dir), rank, world)
        if rank == 0:
            np.savez(out, labelled=split.labelled, losses=split.losses)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_split_identical_in_one_and_two_processes(color_root, tmp_path):
    _, single = split_once(color_root, tmp_path / "one")
    out = tmp_path / "two.npz"
    (tmp_path / "two").mkdir()
    # The plan file is drawn once; both ranks load it (as the pipeline arranges).
    make_ctx(color_root, tmp_path / "two")
    mp.start_processes(_worker, args=(2, _free_port(), str(color_root), str(tmp_path / "two"), str(out)),
                       nprocs=2, join=True, start_method="spawn")
    two = np.load(out)
    np.testing.assert_array_equal(two["labelled"], single.labelled)
    np.testing.assert_allclose(two["losses"], single.losses, rtol=0, atol=1e-6)

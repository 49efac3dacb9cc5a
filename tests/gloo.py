"""Real multi-process runs for the tests: ``run_ranks(fn, world, *args)`` spawns ``world``
processes that join one gloo group on a free local port, calls ``fn(rank, world, *args)``
in each (a module-level function: spawn pickles it by name), and tears the group down;
``rank_data`` is a rank's RunData as the pipeline builds it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.runtime.helpers import free_port


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(fn, world: int, *args) -> None:
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True, start_method="spawn")


def rank_data(cfg, run_dir: Path, rank: int = 0, world: int = 1):
    """Rank ``rank``'s RunData for ``cfg`` (the poisoned training set, its DistInfo on the
    CPU), as the pipeline builds it; where ``world`` > 1 the group is run_ranks'."""
    from engine.attacks.runtime import build_poison
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta, RunData
    from engine.runtime.launch import DistInfo

    meta = load_meta(cfg.data.root)
    dist = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"),
                    pg_backend="gloo" if world > 1 else None, launcher="test")
    return RunData(cfg.data, DatasetMeta.from_raw(meta), dist, cfg.seed, build_poison(cfg, meta, run_dir))

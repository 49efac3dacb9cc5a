"""Real multi-process runs for the tests: ``run_ranks(fn, world, *args)`` spawns ``world``
processes that join one gloo group on a free local port, calls ``fn(rank, world, *args)``
in each (a module-level function: spawn pickles it by name), and tears the group down."""
from __future__ import annotations

import os

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

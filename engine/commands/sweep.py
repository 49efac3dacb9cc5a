from __future__ import annotations

import argparse
from pathlib import Path

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", help="a grid file: base config, overrides and the grid of values (configs/demo/sweep.yaml)")
    p.add_argument("--out", help="the sweep folder (default: runs/sweeps/<grid file name>)")
    p.add_argument("--slurm", action="store_true",
                   help="write sweep.sbatch and submit.sh (one array task per cell) instead of running the cells")
    p.add_argument("--check", action="store_true", help="load and check the grid, list its cells, run nothing")


def main(args: argparse.Namespace) -> int:
    from engine.sweep.grid import load_grid

    grid = load_grid(args.grid)  # every cell's config is checked here, before any work
    out = Path(args.out) if args.out else Path("runs/sweeps") / Path(args.grid).stem
    if args.check:
        for cell in grid.cells:
            print(f"{cell.index:4d}  {cell.name}  stages={','.join(cell.config.stages)}")
        print(f"{len(grid.cells)} cells; sweep folder {out}")
        return 0
    if args.slurm:
        from engine.sweep.slurm import write_slurm

        sbatch, submit = write_slurm(grid, out)
        print(f"wrote {sbatch} and {submit} for {len(grid.cells)} cells; submit with: bash {submit}")
        print(f"each task records its cell in {out}/cells/<name>/status.json; `dbd leaderboard {out}` "
              "gathers them into cells.json and the leaderboard")
        return 0
    from engine.sweep.runner import run_sweep

    failed = run_sweep(grid, out)
    if failed:
        print(f"{failed} of {len(grid.cells)} cells failed: see {out / 'cells.json'} and their error.txt")
        return 1
    return 0


class SweepCommand(Command):
    name = "sweep"
    help = "run every cell of a grid file (or write a Slurm array for it: --slurm)"
    order = 5
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

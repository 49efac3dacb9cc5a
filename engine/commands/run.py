from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.root=/data/cifar10 pretrain.epochs=10")
    p.add_argument("--stages", help="comma-separated subset of the config's stages to run now")
    p.add_argument("--cell-status", metavar="FILE",
                   help="run as a sweep cell (what a `dbd sweep --slurm` array task does): rank 0 records "
                        "running, done or failed (with the error, the traceback in error.txt beside it) in "
                        "FILE, e.g. cells/<name>/status.json")


def _load(args: argparse.Namespace):
    from engine.config import load_config
    from engine.errors import UserError
    from engine.stages import STAGES

    cfg = load_config(args.config, args.overrides)
    stages = None
    if args.stages:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise UserError(f"--stages: unknown stage {unknown[0]!r}; known: {', '.join(STAGES)}")
    return cfg, stages


def main(args: argparse.Namespace) -> int:
    if args.cell_status:
        from pathlib import Path

        from engine.sweep.runner import run_recorded_cell

        # The config is loaded inside, so that a cell whose config fails to load is recorded too.
        run_recorded_cell(Path(args.cell_status), lambda: _load(args))
        return 0
    from engine.pipeline import run

    cfg, stages = _load(args)
    run(cfg, stages=stages)
    return 0


class RunCommand(Command):
    name = "run"
    help = "run the stages a config lists (any launcher: torchrun, deepspeed, mpirun, srun)"
    order = 3
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

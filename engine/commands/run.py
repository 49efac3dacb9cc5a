from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. data.root=/data/cifar10 pretrain.epochs=10")
    p.add_argument("--stages", help="comma-separated subset of the config's stages to run now")


def main(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.stages import STAGES
    from engine.errors import UserError
    from engine.pipeline import run

    cfg = load_config(args.config, args.overrides)
    stages = None
    if args.stages:
        stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise UserError(f"--stages: unknown stage {unknown[0]!r}; known: {', '.join(STAGES)}")
    run(cfg, stages=stages)
    return 0

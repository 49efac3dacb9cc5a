from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides before the options")
    p.add_argument("--force", action="store_true", help="recompute even when a valid cache exists")


def main(args: argparse.Namespace) -> int:
    from engine.attacks import ATTACKS
    from engine.attacks.base import Attack
    from engine.attacks.runtime import runtime_for_command
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)
    attack = ATTACKS.get(cfg.attack.name)
    # Each attack says what it must prepare (Attack.prepare); most need nothing.
    if attack is None or attack.prepare.__func__ is Attack.prepare.__func__:
        print(f"attack {cfg.attack.name} needs no preparation")
        return 0
    runtime = runtime_for_command(cfg, save=True)
    print(runtime.describe())
    attack.prepare(cfg, runtime, force=args.force)
    return 0


class AttackPrepareCommand(Command):
    name = "attack-prepare"
    help = "precompute attack assets (label-consistent PGD perturbations)"
    order = 9
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

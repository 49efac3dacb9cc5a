from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides before the options")
    p.add_argument("--force", action="store_true", help="recompute even when a valid cache exists")


def main(args: argparse.Namespace) -> int:
    from engine.attacks.label_consistent import cache_paths, prepare
    from engine.attacks.runtime import runtime_for_command
    from engine.config import load_config
    from engine.errors import UserError

    cfg = load_config(args.config, args.overrides)
    if cfg.attack.name != "label_consistent":
        print(f"attack {cfg.attack.name} needs no preparation (only label_consistent does)")
        return 0
    runtime = runtime_for_command(cfg, save=True)
    print(runtime.describe())
    if not args.force:
        try:
            runtime.train_attack()
        except UserError:
            pass  # missing or stale: compute it below
        else:
            print(f"perturbations up to date: {cache_paths(cfg.attack.label_consistent, runtime.run_dir)[0]} "
                  f"(--force recomputes)")
            return 0
    prepare(cfg, runtime.meta, runtime, runtime.run_dir)
    return 0

from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides before the options, e.g. attack.name=wanet attack.wanet.s=1")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--split", default="train", choices=["train", "test"],
                   help="train: poisoned training samples (default); test: the poisoned test set")
    p.add_argument("--count", type=int, default=8, help="samples to show (default 8)")
    p.add_argument("--amplify", type=float, default=5.0, help="factor on the difference row (default 5)")


def main(args: argparse.Namespace) -> int:
    from engine.attacks.preview import preview
    from engine.attacks.runtime import runtime_for_command
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)
    runtime = runtime_for_command(cfg, save=False)
    print(runtime.describe())
    out = preview(cfg, runtime, args.out, split=args.split, count=args.count, amplify=args.amplify)
    print(f"wrote {out}")
    return 0


class PreviewCommand(Command):
    name = "preview"
    help = "render clean vs triggered samples of the configured attack"
    order = 7
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides before the options")
    p.add_argument("--split", required=True, choices=["train", "test"],
                   help="train: the poisoned training set; test: the poisoned test set (ASR/RA)")
    p.add_argument("--limit", type=int, help="export only the first N samples of the selection")
    p.add_argument("--poisoned-only", action="store_true", help="train: only the triggered samples")
    p.add_argument("--out", required=True, help=".npz file to write")


def main(args: argparse.Namespace) -> int:
    from engine.attacks.export import export_poisoned
    from engine.attacks.runtime import runtime_for_command
    from engine.config import load_config

    cfg = load_config(args.config, args.overrides)
    runtime = runtime_for_command(cfg, save=False)
    print(runtime.describe())
    s = export_poisoned(cfg, runtime, args.split, args.out, limit=args.limit, poisoned_only=args.poisoned_only)
    print(f"wrote {s['file']}: {s['count']} images {'x'.join(map(str, s['image_shape']))}, "
          f"{s['poisoned']} poisoned, {s['labels_changed']} labels changed"
          + (f", {s['noise']} noise-mode" if s["noise"] else ""))
    return 0


class ExportPoisonedCommand(Command):
    name = "export-poisoned"
    help = "write what the loader delivers before augmentation to .npz"
    order = 8
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

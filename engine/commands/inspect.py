from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .beton file")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def main(args: argparse.Namespace) -> int:
    from engine.data.beton import BetonSummary

    summary = BetonSummary(args.file)
    meta_path = Path(args.file).parent / "meta.json"
    classes = None
    if meta_path.is_file():
        try:
            classes = json.loads(meta_path.read_text()).get("classes")
        except json.JSONDecodeError:
            classes = None
    if args.json:
        print(json.dumps({"file": str(summary.path), "num_samples": summary.num_samples,
                          "fields": summary.field_names, "size_range": summary.size_range(),
                          "label_histogram": summary.histogram()}, indent=2))
    else:
        print(summary.describe(classes))
    return 0


class InspectCommand(Command):
    name = "inspect"
    help = "summarise a .beton file: count, image sizes, label histogram"
    order = 2
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from engine.data.decode_geometry import DEFAULT_DECODE_SIZE
    from engine.data.sources import READERS

    p.add_argument("dataset", choices=READERS, help="source format")
    p.add_argument("--source", help="path to the dataset in its standard format: cifar10/cifar100 the python folder or "
                   ".tar.gz, tinyimagenet the tiny-imagenet-200 folder, ... (not needed for digits)")
    p.add_argument("--out", required=True, help="output folder for train.beton, test.beton, meta.json")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--classes", dest="classes_file", help="imagefolder: file of class folder names to keep")
    p.add_argument("--size", type=int, default=32, help="gtsrb: side the images are resized to (default 32)")
    p.add_argument("--max-resolution", type=int, default=512,
                   help="imagefolder: cap on the longer side, in pixels (default 512)")
    p.add_argument("--decode-size", type=int, default=DEFAULT_DECODE_SIZE,
                   help=f"imagefolder: store each image as its centre square resized to this side, the loader's "
                        f"training frame, so loading costs one decode (default {DEFAULT_DECODE_SIZE}, the presets' "
                        f"data.decode_size; runs must use the same data.decode_size). 0: keep source resolution "
                        f"(capped by --max-resolution); the loader then crops and resizes every epoch")
    p.add_argument("--jpeg-quality", type=int, default=90, help="imagefolder: JPEG quality (default 90)")
    p.add_argument("--write-mode", default="", choices=["", "raw", "jpg", "smart"],
                   help="FFCV write mode (default: raw for fixed-size sets, jpg for imagefolder)")
    p.add_argument("--workers", type=int, default=0, help="writer processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from engine.data.prepare import WriterSettings, describe, prepare

    meta = prepare(args.dataset, args.source, args.out, force=args.force, classes_file=args.classes_file,
                   size=args.size, progress=not args.no_progress,
                   writer=WriterSettings(write_mode=args.write_mode, max_resolution=args.max_resolution,
                                         jpeg_quality=args.jpeg_quality, num_workers=args.workers,
                                         decode_size=args.decode_size))
    print(describe(meta))
    print(f"wrote {args.out}/train.beton, test.beton, meta.json")
    return 0


class PrepareCommand(Command):
    name = "prepare"
    help = "write a dataset to train/test .beton files + meta.json"
    order = 1
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `dbd run`")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.report.build import build_report

    print(build_report(args.run_dir))
    print(f"report: {Path(args.run_dir) / 'report.md'}")
    return 0

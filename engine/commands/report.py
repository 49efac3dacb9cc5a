from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `dbd run`")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.defenses import report_columns
    from engine.report.build import build_report
    from engine.rundir import REPORT

    print(build_report(args.run_dir, report_columns()))
    print(f"report: {Path(args.run_dir) / REPORT}")
    return 0


class ReportCommand(Command):
    name = "report"
    help = "rebuild report.md and plots of a run directory from its files"
    order = 4
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

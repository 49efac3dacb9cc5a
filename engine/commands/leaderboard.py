from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep folder written by `dbd sweep` (it holds cells.json)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.defenses import report_columns
    from engine.report.leaderboard import build_leaderboard
    from engine.rundir import LEADERBOARD
    from engine.sweep.runner import refresh_index

    refresh_index(Path(args.sweep))  # the cells' status files: the one source of their statuses
    print(build_leaderboard(args.sweep, report_columns()))
    print(f"leaderboard: {Path(args.sweep) / LEADERBOARD}")
    return 0


class LeaderboardCommand(Command):
    name = "leaderboard"
    help = "write leaderboard.md/.csv and plots of a sweep folder"
    order = 6
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

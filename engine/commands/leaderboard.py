from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="a sweep folder written by `dbd sweep` (it holds cells.json)")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.report.leaderboard import build_leaderboard
    from engine.sweep.runner import refresh_index

    refresh_index(Path(args.sweep))  # the cells' status files: the one source of their statuses
    print(build_leaderboard(args.sweep))
    print(f"leaderboard: {Path(args.sweep) / 'leaderboard.md'}")
    return 0

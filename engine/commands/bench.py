"""``dbd bench``: the throughput benchmark suite (the same as ``python -m benchmarks``)."""
from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.suite import add_arguments as suite_arguments

    suite_arguments(p)


def main(args: argparse.Namespace) -> int:
    from benchmarks.suite import UnknownBenchmark, run_from_args
    from engine.errors import UserError

    try:
        return run_from_args(args)
    except UnknownBenchmark as e:
        raise UserError(str(e)) from None


class BenchCommand(Command):
    name = "bench"
    help = "run the throughput benchmark suite"
    order = 10
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

"""``dbd bench``: the throughput benchmark suite (the same as ``python -m benchmarks``)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from benchmarks.suite import add_arguments as suite_arguments

    suite_arguments(p)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from benchmarks.suite import REGISTRY, UnknownBenchmark, default_device, run_suite, select, table
    from engine.errors import UserError

    if args.list:
        for b in REGISTRY.values():
            print(f"{b.name:<12} {b.summary}")
        return 0
    try:
        names = select(args.names)
    except UnknownBenchmark as e:
        raise UserError(str(e)) from None
    records, failures = run_suite(names, quick=args.quick, out=Path(args.out), device=default_device(args.device),
                                  threads=args.threads, isolate=not args.in_process)
    if records:
        print()
        print(table(records))
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0

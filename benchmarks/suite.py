"""The benchmark suite: registry, runner, the table, and the CLI of ``python -m benchmarks``
(``dbd bench``). Every benchmark is a module with ``run(quick: bool, ...) -> dict`` (it
may also take ``device``, ``threads`` and ``out``), run in a child process of its own
(``harness.run_child``) unless ``--in-process``. Details: docs/benchmarks.md."""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmarks.harness import environment, jsonable, load_average, run_child, write_outputs

DEFAULT_OUT = "benchmarks/results"


@dataclass(frozen=True)
class Benchmark:
    name: str
    summary: str
    quick_limit_s: int = 300
    full_limit_s: int = 900
    # False: run only when named (the suite's default run leaves it out).
    default: bool = True
    # False: the benchmark starts its own child processes for its parts, so the runner
    # calls it in this process (a child of a child would outlive a timeout's kill).
    isolate: bool = True

    @property
    def module(self) -> str:
        return f"benchmarks.{self.name}"


REGISTRY: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("loader", "images/s delivered to the training loop: engine loader + device views vs the reference "
              "DataLoader; trigger cost per attack", full_limit_s=1200),
    # 540 s: the device machine's 10-minute limit, less start-up; the check itself plans
    # for at most 8 minutes (benchmarks/gpu/plan.yaml, caps).
    Benchmark("gpu", "the prepared one-GPU check: Triton kernels against the PyTorch twin, view timing, real "
              "SimCLR/MixMatch steps (CIFAR and ImageNet size, bf16/fp32), every stage on the device, NCCL "
              "(--smoke: its CPU path)", quick_limit_s=300, full_limit_s=540, default=False, isolate=False),
    Benchmark("scale", "per-core prepare and loader images/s, bytes/image and peak RSS on a synthetic ImageFolder "
              "tree; the derived .beton size, prepare time and cores per GPU for ImageNet-1k/-100",
              full_limit_s=1200, default=False),
)}


def run_in_process(name: str, quick: bool, device: str | None = None, threads: int | None = None,
                   out: str | None = None) -> dict:
    bench = REGISTRY[name]
    fn = importlib.import_module(bench.module).run
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in (("device", device), ("threads", threads), ("out", out))
              if v is not None and k in params}
    t0 = time.perf_counter()
    env = environment()
    result = fn(quick=quick, **kwargs)
    record = {"benchmark": name, "summary": bench.summary, "quick": quick, "threads_option": threads,
              "environment": {**env, "load_average_after": load_average()}, "wall_seconds": time.perf_counter() - t0}
    return jsonable({**result, **record})


def _fmt(v, stats: dict | None = None) -> str:
    """A figure (3 significant digits, thousands separators from 100), with its quartiles."""
    if not isinstance(v, (int, float)):
        return "-"
    text = "0" if v == 0 else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return text + (f" ({_fmt(stats['q1'])}–{_fmt(stats['q3'])})" if stats and "q1" in stats else "")


def table(records: list[dict], spread: bool = False) -> str:
    """A Markdown table: one row per comparison (engine, reference, ratio), one per
    measurement of a benchmark without comparisons; ``spread``: with the quartiles."""
    lines = ["| benchmark | figure | unit | engine | reference | ratio |", "|" + " --- |" * 6]
    for rec in records:
        b = rec["benchmark"]
        for key, c in (rec.get("comparisons") or {}).items():
            lines.append(f"| {b} | {key}{' *' if key == rec.get('headline') else ''} | {c['unit']} | "
                         f"{_fmt(c['engine'], spread and c.get('engine_stats'))} | "
                         f"{_fmt(c['reference'], spread and c.get('reference_stats'))} | {_fmt(c['ratio'])} |")
        if not rec.get("comparisons"):
            lines += [f"| {b} | {key} | {m.get('unit', '')} | {_fmt(m.get('median'), spread and m)} | | |"
                      for key, m in (rec.get("measurements") or {}).items()]
    lines.append("(* headline figure; ratio = engine / reference, higher is better)")
    if any(rec.get("quick") for rec in records):
        lines.append("(--quick: a smoke run without warm-up; its figures are not measurements)")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="benchmarks to run (default: all of "
                   f"{', '.join(n for n, b in REGISTRY.items() if b.default)}; gpu and scale run only when named)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions: a smoke run")
    p.add_argument("--smoke", action="store_true", help="the same as --quick (for gpu: its CPU path, Triton "
                   "interpreted, as CI runs it)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON and PNG files (default {DEFAULT_OUT})")
    p.add_argument("--device", help="device for the engine's views and steps (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU for the engine's side (default: the "
                   "engine's own setting)")
    p.add_argument("--in-process", action="store_true", help="run every benchmark in this process (no isolation)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--report", metavar="DIR", help="print the Markdown tables of a results folder and exit")


class UnknownBenchmark(ValueError):
    pass


def select(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UnknownBenchmark(f"unknown benchmark {unknown[0]!r}; known: {', '.join(REGISTRY)}")
    return list(dict.fromkeys(names)) or [n for n, b in REGISTRY.items() if b.default]


def run_suite(names: list[str], *, quick: bool, out: Path, device: str | None = None, threads: int | None = None,
              isolate: bool = True, echo: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Run ``names`` in order; returns the records and the failures (one line each)."""
    records, failures = [], []
    for name in names:
        bench = REGISTRY[name]
        echo(f"[bench] {name}: {bench.summary}{' (quick)' if quick else ''}")
        t0 = time.perf_counter()
        try:
            kwargs = dict(name=name, quick=quick, device=device, threads=threads, out=str(out))
            record = (run_child("benchmarks.suite:run_in_process", kwargs,
                                timeout=bench.quick_limit_s if quick else bench.full_limit_s)
                      if isolate and bench.isolate else run_in_process(**kwargs))
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
            echo(f"[bench] {name} FAILED: {type(e).__name__}: {e}")
            continue
        json_path, png = write_outputs(record, Path(out))
        records.append(record)
        echo(f"[bench] {name}: {time.perf_counter() - t0:.1f} s -> {json_path}" + (f", {png.name}" if png else ""))
    return records, failures


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Throughput benchmarks: the engine against the reference way.",
                                epilog="benchmarks: " + ", ".join(f"{b.name} ({b.summary})" for b in REGISTRY.values()))
    add_arguments(p)
    try:
        return run_from_args(p.parse_args(argv))
    except UnknownBenchmark as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_from_args(args: argparse.Namespace) -> int:
    """List, or run the selected benchmarks and print the table (``UnknownBenchmark`` on a bad name)."""
    if args.list:
        for b in REGISTRY.values():
            print(f"{b.name:<12} {b.summary}")
        return 0
    if args.report:
        print(table([json.loads(p.read_text()) for p in sorted(Path(args.report).glob("*.json"))], spread=True))
        return 0
    names = select(args.names)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    records, failures = run_suite(names, quick=args.quick or args.smoke, out=Path(args.out), device=args.device,
                                  threads=args.threads, isolate=not args.in_process)
    if records:
        print()
        print(table(records))
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0

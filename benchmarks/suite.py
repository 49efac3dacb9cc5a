"""The benchmark suite: registry, runner, environment capture, JSON + PNG output, table.

Every benchmark is a module with ``run(quick: bool, ...) -> dict``. The runner starts
each in its own Python process: a benchmark's thread settings (importing FFCV sets
torch's thread count; its loaders change it again), numba compilations and memory do
not leak into the next one, and a benchmark that hangs is stopped at its time limit
instead of stalling the suite. ``--in-process`` runs them in this process instead.

Each benchmark's JSON holds the environment (machine, CPU, cores, load, device,
versions, commit, date), the settings, every repetition with medians and spread,
and, for comparisons, ``unit``, ``engine``, ``reference`` (medians) and ``ratio``
(engine over reference, higher is better) at its top level.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = "benchmarks/results"


@dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    summary: str
    adapt: str = ""  # name of a function here that converts a wrapped module's result
    quick_limit_s: int = 300
    full_limit_s: int = 900


REGISTRY: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("loader", "benchmarks.loader_compare",
              "images/s delivered to the training loop: engine loader + device views vs the reference DataLoader"),
    Benchmark("augment", "benchmarks.augment",
              "view kernels: fused / PyTorch path / torchvision v2 / kornia / PIL at 32 and 224 px",
              adapt="adapt_augment"),
    Benchmark("step", "benchmarks.step_stages",
              "training images/s per stage, backend and precision; share of step time waiting for data",
              full_limit_s=1800),
    Benchmark("scaling", "benchmarks.scaling", "the SimCLR step at world size 1, 2, ... on CPU: weak scaling"),
    Benchmark("end_to_end", "benchmarks.end_to_end",
              "one epoch per DBD stage: engine loader vs the reference DataLoader feeding the same step",
              full_limit_s=1200),
    Benchmark("flops", "benchmarks.flops", "ResNet-18/50 FLOPs per image, forward and forward+backward"),
)}


# --------------------------------------------------------------------------- environment


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or installed without metadata
        return None


def git_commit(short: bool = False) -> str:
    """The checkout's commit; outside a git checkout (an exported tree), ``unknown``."""
    args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                   capture_output=True, text=True, timeout=10)
            return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    # No git binary: read the ref by hand.
    head = REPO / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (REPO / ".git" / ref[5:]).read_text().strip()
        return ref[:7] if short else ref
    except OSError:
        return "unknown"


def environment() -> dict:
    import numpy
    import torch

    cuda = torch.cuda.is_available()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.node(),
        "platform": platform.platform(),
        "arch": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1_5_15": load,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "ffcv": _version("ffcv"),
        "numpy": numpy.__version__,
        "numba": _version("numba"),
        "kornia": _version("kornia"),
        "deepspeed": _version("deepspeed"),
        "pillow": _version("pillow"),
        "commit": git_commit(),
    }


# --------------------------------------------------------------------------- adapters


def _stats(values: list[float]) -> dict:
    from benchmarks.measure import summarize

    return summarize(values)


def adapt_augment(res: dict) -> dict:
    """benchmarks/augment.py reports per method and size; add comparisons against the engine's method."""
    out = dict(res)
    engine_method = res.get("engine_method", "torch_path")
    comparisons = {}
    measurements = {}
    for label, methods in res.get("results", {}).items():
        for name, m in methods.items():
            measurements[f"{label}/{name}"] = {"unit": res.get("unit", "views/s"), **_stats(m["reps"]),
                                               "device": m.get("device")}
        if engine_method not in methods:
            continue
        eng = methods[engine_method]
        for name, m in methods.items():
            if name == engine_method:
                continue
            comparisons[f"{label}/{engine_method}_vs_{name}"] = {
                "unit": res.get("unit", "views/s"), "engine": eng["median"], "reference": m["median"],
                "ratio": eng["median"] / m["median"], "engine_stats": _stats(eng["reps"]),
                "reference_stats": _stats(m["reps"])}
    out["comparisons"] = comparisons
    out["measurements"] = measurements
    out.setdefault("headline", f"32px/{engine_method}_vs_pil")
    out.setdefault("notes", []).append(
        "measured by benchmarks/augment.py: each method runs its repetitions in turn (not alternated), "
        "all in the same process and run")
    settings = {k: res[k] for k in ("batch", "views_per_image", "quick", "device", "torch_threads") if k in res}
    out.setdefault("settings", settings)
    targets = []
    if str(res.get("device", "cpu")).startswith("cuda") and "fused" in res.get("results", {}).get("32px", {}):
        from benchmarks.measure import target

        for label in res["results"]:
            r = res["results"][label]
            if "fused" in r and "torchvision_v2" in r:
                targets.append(target(f"GPU fused SimCLR view vs torchvision v2 at {label}",
                                      r["fused"]["median"] / r["torchvision_v2"]["median"], ">=", 10.0))
    else:
        out.setdefault("not_measured", []).append(
            "fused Triton kernels and the >= 10x-over-torchvision-v2 GPU target: no GPU in this run")
    out["targets"] = targets
    return out


# --------------------------------------------------------------------------- running


def _call_run(module, quick: bool, device: str | None, threads: int | None) -> dict:
    # Benchmarks take the options they have: the wrapped modules of other authors may
    # lack ``device`` or ``threads``.
    params = inspect.signature(module.run).parameters
    kwargs = {}
    if "quick" in params:
        kwargs["quick"] = quick
    if device is not None and "device" in params:
        kwargs["device"] = device
    if threads is not None and "threads" in params:
        kwargs["threads"] = threads
    return module.run(**kwargs)


def run_in_process(name: str, quick: bool, device: str | None = None, threads: int | None = None) -> dict:
    bench = REGISTRY[name]
    module = importlib.import_module(bench.module)
    t0 = time.perf_counter()
    env_before = environment()
    result = _call_run(module, quick, device, threads)
    if bench.adapt:
        result = globals()[bench.adapt](result)
    wall = time.perf_counter() - t0
    try:
        load_after = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load_after = None
    record = {"benchmark": name, "summary": bench.summary, "quick": quick, "threads_option": threads,
              "environment": {**env_before, "load_average_after": load_after}, "wall_seconds": wall}
    for key, value in result.items():
        record.setdefault(key, value)
    return _jsonable(record)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# Known-harmless output of the libraries, dropped from a child's output: numba's TBB
# threading layer warns (on stdout) at every fork of a DataLoader worker while FFCV's
# loader threads are busy, and numba's finalizers
# report KeyErrors at interpreter exit (shared/reference/pitfalls.md). Everything else,
# including any other "Exception ignored" report, passes through.
_FORK_NOISE = "Unable to join threads to shut down before fork()"
_FINALIZER_START = "Exception ignored in: <finalize object"


def _relay(stream, out) -> None:
    held: list[str] = []  # a finalizer report, kept until its last line shows what it was
    skip_blank = False
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        if held:
            held.append(line)
            if line.startswith((" ", "\t", "Traceback")):
                continue
            if not line.startswith("KeyError"):
                out.write("".join(held))
            held = []
            continue
        if line.startswith(_FINALIZER_START):
            held = [line]
            continue
        if _FORK_NOISE in line:
            skip_blank = True
            continue
        if skip_blank and not line.strip():
            continue
        skip_blank = False
        out.write(line)
        out.flush()
    if held:
        out.write("".join(held))
    stream.close()


def run_isolated(name: str, quick: bool, device: str | None, threads: int | None, limit_s: int) -> dict:
    """Run one benchmark in a child interpreter; its JSON comes back through a file."""
    with tempfile.TemporaryDirectory(prefix="dbd-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks", "--child", name, "--child-out", str(out)]
        if quick:
            cmd.append("--quick")
        if device:
            cmd += ["--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        relays = [threading.Thread(target=_relay, args=(src, dst), daemon=True)
                  for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for r in relays:
            r.start()
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            # The child runs in its own session: stop it and whatever it started.
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"benchmark {name} did not finish within {limit_s} s") from None
        finally:
            for r in relays:
                r.join(timeout=5)
        if not out.is_file():
            raise RuntimeError(f"benchmark {name} failed (exit status {rc}; its output is above)")
        record = json.loads(out.read_text())  # written atomically: present means complete
        if rc != 0:
            print(f"note: benchmark {name} exited with status {rc} after writing its result", file=sys.stderr)
            record["child_exit_status"] = rc
        return record


def write_outputs(record: dict, out_dir: Path) -> tuple[Path, Path | None]:
    from engine.fsutil import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{record['benchmark']}.json"
    write_json(path, record)
    png = out_dir / f"{record['benchmark']}.png"
    try:
        chart(record, png)
    except Exception as e:  # a chart is a convenience: never lose the JSON over it
        print(f"note: no chart for {record['benchmark']}: {type(e).__name__}: {e}", file=sys.stderr)
        return path, None
    return path, png


def chart(record: dict, path: Path) -> None:
    """Bars of medians with quartile whiskers: engine vs reference per comparison,
    or one bar per measurement for a benchmark without comparisons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = record.get("comparisons") or {}
    rows = []
    for key, c in comps.items():
        e, r = c.get("engine_stats", {}), c.get("reference_stats", {})
        rows.append((key, c["unit"], c["engine"], e.get("q1"), e.get("q3"), c["reference"], r.get("q1"), r.get("q3")))
    if rows:
        units = sorted({r[1] for r in rows})
        fig, axes = plt.subplots(len(units), 1, figsize=(10, 1.0 + 0.55 * len(rows) + 0.8 * len(units)), squeeze=False)
        for ax, unit in zip(axes[:, 0], units):
            sel = [r for r in rows if r[1] == unit]
            ys = range(len(sel))
            for off, (vi, lo, hi), color, label in ((-0.2, (2, 3, 4), "tab:blue", "engine"),
                                                    (0.2, (5, 6, 7), "tab:gray", "reference")):
                vals = [r[vi] for r in sel]
                err = [[max(0.0, v - (r[lo] if r[lo] is not None else v)) for v, r in zip(vals, sel)],
                       [max(0.0, (r[hi] if r[hi] is not None else v) - v) for v, r in zip(vals, sel)]]
                ax.barh([y + off for y in ys], vals, height=0.38, xerr=err, color=color, label=label)
            ax.set_yticks(list(ys))
            ax.set_yticklabels([f"{r[0]}  ({r[2] / r[5]:.2g}x)" for r in sel], fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel(f"{unit} (median, quartile whiskers; log scale)")
            ax.invert_yaxis()
            ax.legend(loc="lower right", fontsize=8)
    else:
        meas = {k: m for k, m in (record.get("measurements") or {}).items()
                if isinstance(m.get("median"), (int, float))}
        if not meas:
            raise ValueError("nothing to plot")
        units = sorted({m.get("unit", "") for m in meas.values()})
        fig, axes = plt.subplots(len(units), 1, figsize=(10, 1.0 + 0.4 * len(meas) + 0.8 * len(units)), squeeze=False)
        for ax, unit in zip(axes[:, 0], units):
            sel = [(k, m) for k, m in meas.items() if m.get("unit", "") == unit]
            ax.barh(range(len(sel)), [m["median"] for _, m in sel], color="tab:blue")
            ax.set_yticks(range(len(sel)))
            ax.set_yticklabels([k for k, _ in sel], fontsize=8)
            ax.set_xlabel(unit)
            ax.invert_yaxis()
    env = record.get("environment", {})
    fig.suptitle(f"{record['benchmark']}{' (quick)' if record.get('quick') else ''}: {env.get('device', '')}, "
                 f"{env.get('cpu_count', '?')} cores, {env.get('commit', '')[:12]}, {env.get('date', '')[:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    if not isinstance(v, (int, float)):
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def table(records: list[dict]) -> str:
    """One line per comparison (engine, reference, ratio), one per benchmark without."""
    head = f"{'benchmark':<12} {'figure':<46} {'unit':<14} {'engine':>12} {'reference':>12} {'ratio':>8}"
    lines = [head, "-" * len(head)]
    for rec in records:
        comps = rec.get("comparisons") or {}
        if comps:
            for key, c in comps.items():
                mark = " *" if key == rec.get("headline") else ""
                lines.append(f"{rec['benchmark']:<12} {(key + mark)[:46]:<46} {c['unit'][:14]:<14} "
                             f"{_fmt(c['engine']):>12} {_fmt(c['reference']):>12} {_fmt(c['ratio']):>8}")
        else:
            for key, m in (rec.get("measurements") or {}).items():
                lines.append(f"{rec['benchmark']:<12} {key[:46]:<46} {str(m.get('unit', ''))[:14]:<14} "
                             f"{_fmt(m.get('median')):>12} {'':>12} {'':>8}")
    lines.append("(* headline figure; ratio = engine / reference, higher is better)")
    if any(rec.get("quick") for rec in records):
        # Quick runs skip warm-up and time a step or two: compilation dominates them.
        lines.append("(--quick: a smoke run without warm-up; its figures are not measurements, "
                     "run without --quick for those)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None, prog: str = "python -m benchmarks") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Throughput benchmarks: the engine against the reference way.",
                                epilog="benchmarks: " + ", ".join(f"{b.name} ({b.summary})" for b in REGISTRY.values()))
    add_arguments(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", metavar="NAME",
                   help=f"benchmarks to run (default: all of {', '.join(REGISTRY)})")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions: a smoke run in seconds")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"folder for the JSON and PNG files (default {DEFAULT_OUT})")
    p.add_argument("--device", help="device for the engine's views and steps (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU for the engine's side (default: each "
                   "benchmark's own: the engine's setting, 1 per core in augment)")
    p.add_argument("--in-process", action="store_true", help="run every benchmark in this process (no isolation)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")


def default_device(device: str | None) -> str:
    """The device for the engine's side: as given, else CUDA where there is a GPU."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class UnknownBenchmark(ValueError):
    pass


def select(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UnknownBenchmark(f"unknown benchmark {unknown[0]!r}; known: {', '.join(REGISTRY)}")
    return list(dict.fromkeys(names)) or list(REGISTRY)


def run_suite(names: list[str], *, quick: bool, out: Path, device: str | None = None, threads: int | None = None,
              isolate: bool = True, echo: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Run ``names`` in order; returns the records and the failures (one line each)."""
    records, failures = [], []
    out = Path(out)
    for name in names:
        bench = REGISTRY[name]
        echo(f"[bench] {name}: {bench.summary}{' (quick)' if quick else ''}")
        t0 = time.perf_counter()
        try:
            if isolate:
                record = run_isolated(name, quick, device, threads,
                                      bench.quick_limit_s if quick else bench.full_limit_s)
            else:
                record = run_in_process(name, quick, device, threads)
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
            echo(f"[bench] {name} FAILED: {type(e).__name__}: {e}")
            continue
        json_path, png = write_outputs(record, out)
        records.append(record)
        echo(f"[bench] {name}: {time.perf_counter() - t0:.1f} s -> {json_path}" + (f", {png.name}" if png else ""))
    return records, failures


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    args = parse_args(argv, prog)
    if args.child:
        record = run_in_process(args.child, args.quick, args.device, args.threads)
        from engine.fsutil import write_json

        write_json(args.child_out, record)
        sys.stdout.flush()
        sys.stderr.flush()
        # The result is safely written: skip interpreter teardown, where threads left by
        # FFCV, numba's TBB pool or DeepSpeed can abort the process ("terminate called
        # without an active exception") after the work is done.
        os._exit(0)
    try:
        return run_from_args(args)
    except UnknownBenchmark as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_from_args(args: argparse.Namespace) -> int:
    """List, or run the selected benchmarks and print the table (``UnknownBenchmark`` on a bad name)."""
    if args.list:
        for b in REGISTRY.values():
            print(f"{b.name:<12} {b.summary}")
        return 0
    names = select(args.names)
    records, failures = run_suite(names, quick=args.quick, out=Path(args.out), device=default_device(args.device),
                                  threads=args.threads, isolate=not args.in_process)
    if records:
        print()
        print(table(records))
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0

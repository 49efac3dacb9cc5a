"""What every benchmark shares: repetition, alternation, statistics, the environment,
child processes and multi-process jobs on a free port, and the JSON + PNG output.

Rules it enforces: warm-up before timing (numba and torch compile, caches fill),
several repetitions with every one kept, medians with their spread, and comparisons
measured in one run with the two sides alternating (ABBA order), so a machine that
slows down or speeds up during the run affects both sides alike.

``python -m benchmarks.harness JOB`` is one child (or rank) started by ``run_child``.
"""
from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- timing


def summarize(values: list[float]) -> dict:
    """Median and spread (quartiles, min, max) of repetitions, every repetition kept."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no repetitions to summarise")
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) >= 2 else (vals[0],) * 3
    return {"reps": vals, "median": statistics.median(vals), "q1": q1, "q3": q3, "min": min(vals), "max": max(vals)}


def rate(fn: Callable[[], int]) -> float:
    """Items per second of one call of ``fn`` (which returns how many items it handled)."""
    t0 = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    if n <= 0:
        raise RuntimeError("a timed repetition handled no items")
    return n / max(dt, 1e-9)


def alternate(sides: dict[str, Callable[[int], float]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each side's ``fn(rep) -> rate`` ``warmup`` times untimed (rep -1, -2, ...), then
    ``reps`` timed rounds; the order within a round reverses every round (A B, B A, ...)."""
    names = list(sides)
    for w in range(warmup):
        for name in names:
            sides[name](-1 - w)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(float(sides[name](r)))
    return out


def shuffled(sides: dict[str, Callable[[int], float]], reps: int, warmup: int = 1, seed: int = 0) -> dict:
    """``alternate`` for more than two sides: ``warmup`` untimed rounds, then ``reps``
    rounds, each in a fresh (seeded) random order."""
    for w in range(warmup):
        for fn in sides.values():
            fn(-1 - w)
    order, out = random.Random(seed), {n: [] for n in sides}
    for r in range(reps):
        for name in order.sample(list(sides), len(sides)):
            out[name].append(float(sides[name](r)))
    return out


def comparison(unit: str, engine: list[float], reference: list[float], **extra) -> dict:
    """Engine vs reference, higher is better: the ratio of medians, plus each round's ratio."""
    e, r = summarize(engine), summarize(reference)
    return {"unit": unit, "engine": e["median"], "reference": r["median"], "ratio": e["median"] / r["median"],
            "round_ratios": [a / b for a, b in zip(engine, reference)],
            "engine_stats": e, "reference_stats": r, **extra}


def measurement(unit: str, values: list[float], **extra) -> dict:
    return {"unit": unit, **summarize(values), **extra}


def target(name: str, value: float, op: str, bound: float, note: str = "") -> dict:
    """A recorded (never asserted) target: ``value op bound`` with op '>=' or '<='."""
    met = value >= bound if op == ">=" else value <= bound
    return {"name": name, "value": value, "target": f"{op} {bound:g}", "met": bool(met), "note": note}


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def pin_torch_threads(n: int | None) -> int:
    """Hold torch's intra-op thread count at ``n`` for the rest of the process.

    FFCV sets torch's thread count to its loader thread count whenever a loader is built
    or an epoch starts, and DeepSpeed's CPU accelerator sets it to 1 at start-up, so an
    explicit choice must survive both: FFCV's hook is narrowed to numba's threads by the
    engine's own patch (engine.runtime.threads.neutralise_ffcv, which every engine loader
    applies). ``None`` keeps the engine's behaviour. Returns the count in effect."""
    import torch

    if n is None:
        return torch.get_num_threads()
    from engine.runtime.threads import neutralise_ffcv

    neutralise_ffcv()
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- multi-process jobs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(target_fn: str, kwargs: dict, *, timeout: float, world: int = 0, threads: int = 0,
              env: dict[str, str] | None = None):
    """``module:function(**kwargs)`` in a fresh interpreter; its (rank 0's) return value.

    ``world`` > 0 starts that many ranks on this machine, which find each other through
    the env:// variables the engine reads. Each child runs in its own session, so a
    timeout stops it and whatever it started (DataLoader workers, ranks). ``env``: extra
    variables for the child alone (e.g. TRITON_INTERPRET, which Triton reads at import)."""
    with tempfile.TemporaryDirectory(prefix="dbd-bench-child-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"target": target_fn, "kwargs": kwargs, "out": str(out)}))
        base = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if threads:
            base["OMP_NUM_THREADS"] = str(threads)
        base.update(env or {})
        if world:
            base.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            base.pop("TORCHELASTIC_RUN_ID", None)
        envs = [{**base, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world)] if world else [base]
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.harness", str(job)], cwd=REPO, env=env,
                                  start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for env in envs]
        relays = [threading.Thread(target=_relay, args=(src, dst), daemon=True)
                  for p in procs for src, dst in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
        for t in relays:
            t.start()
        deadline = time.monotonic() + timeout
        try:
            codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{target_fn} did not finish within {timeout:.0f} s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
            for t in relays:
                t.join(timeout=5)
        if any(codes) or not out.is_file():
            raise RuntimeError(f"{target_fn} failed (exit status {codes}; its output is above)")
        return json.loads(out.read_text())  # written atomically: present means complete


def _relay(stream, out) -> None:
    """A child's output, less the libraries' known-harmless noise: numba's TBB layer warns
    at every fork of a DataLoader worker while FFCV's threads are busy, and numba's
    finalizers report KeyErrors (shared/reference/pitfalls.md). Anything else passes."""
    held: list[str] = []  # a finalizer report, kept until its last line shows what it was
    for line in iter(lambda: stream.readline().decode(errors="replace"), ""):
        if held or line.startswith("Exception ignored in: <finalize object"):
            held.append(line)
            if line.startswith((" ", "\t", "Traceback", "Exception ignored")):
                continue
            if not line.startswith("KeyError"):
                out.write("".join(held))
            held = []
        elif "Unable to join threads to shut down before fork()" not in line:
            out.write(line)
            out.flush()
    out.write("".join(held))


def _child_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    module, name = job["target"].split(":")
    try:
        result = getattr(importlib.import_module(module), name)(**job["kwargs"])
    except Exception:
        traceback.print_exc()
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        from engine.fsutil import write_json

        write_json(job["out"], jsonable(result))
    return 0


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # not installed, or installed without metadata
        return None


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with uncommitted changes); ``unknown`` outside git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode == 0 and head.stdout.strip():
            dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # no git binary: read the ref by hand
        ref = (REPO / ".git" / "HEAD").read_text().strip()
        return (REPO / ".git" / ref[5:]).read_text().strip() if ref.startswith("ref: ") else ref
    except OSError:
        return "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    import numpy
    import torch

    cuda = torch.cuda.is_available()
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.lower().startswith("model name")), platform.processor() or platform.machine())
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.node(), "platform": platform.platform(), "arch": platform.machine(), "cpu_model": cpu,
           "cpu_count": os.cpu_count(),
           "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "load_average_1_5_15": load_average(), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "cuda": torch.version.cuda if cuda else None, "gpu_count": torch.cuda.device_count() if cuda else 0,
           "python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for dist in ("torchvision", "ffcv", "numba", "kornia", "deepspeed", "pillow"):
        env[dist] = _version(dist)
    return {**env, "commit": git_commit()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# --------------------------------------------------------------------------- output


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except (ValueError, TypeError):
            pass
    return str(obj)


def write_outputs(record: dict, out_dir: Path) -> tuple[Path, Path | None]:
    """``<name>.json`` and, where there is something to plot, ``<name>.png``."""
    from engine.fsutil import write_json

    out_dir.mkdir(parents=True, exist_ok=True)
    path, png = out_dir / f"{record['benchmark']}.json", out_dir / f"{record['benchmark']}.png"
    write_json(path, record)
    try:
        chart(record, png)
    except Exception as e:  # a chart is a convenience: never lose the JSON over it
        print(f"note: no chart for {record['benchmark']}: {type(e).__name__}: {e}", file=sys.stderr)
        return path, None
    return path, png


def chart(record: dict, path: Path) -> None:
    """Bars of medians with quartile whiskers: engine vs reference per comparison (log
    scale), or one bar per measurement for a benchmark without comparisons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = record.get("comparisons") or {}
    if comps:
        bars = {k: [(c["engine"], c.get("engine_stats", {})), (c["reference"], c.get("reference_stats", {}))]
                for k, c in comps.items()}
        units = {k: c["unit"] for k, c in comps.items()}
    else:
        meas = {k: m for k, m in (record.get("measurements") or {}).items()
                if isinstance(m.get("median"), (int, float))}
        if not meas:
            raise ValueError("nothing to plot")
        bars = {k: [(m["median"], m)] for k, m in meas.items()}
        units = {k: m.get("unit", "") for k, m in meas.items()}
    groups = sorted(set(units.values()))
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 1.0 + 0.5 * len(bars) + 0.8 * len(groups)), squeeze=False)
    for ax, unit in zip(axes[:, 0], groups):
        keys = [k for k in bars if units[k] == unit]
        sides = (("engine", "tab:blue"), ("reference", "tab:gray")) if comps else (("", "tab:blue"),)
        height = 0.8 / len(sides)
        for j, (label, color) in enumerate(sides):
            vals = [bars[k][j][0] for k in keys]
            err = [[max(0.0, v - bars[k][j][1].get("q1", v)) for v, k in zip(vals, keys)],
                   [max(0.0, bars[k][j][1].get("q3", v) - v) for v, k in zip(vals, keys)]]
            ys = [i + (j - (len(sides) - 1) / 2) * height for i in range(len(keys))]
            ax.barh(ys, vals, height=height, xerr=err, color=color, label=label or None)
        ax.set_yticks(range(len(keys)))
        ax.set_yticklabels([f"{k}  ({comps[k]['ratio']:.2g}x)" if comps else k for k in keys], fontsize=8)
        ax.set_xlabel(f"{unit} (median, quartile whiskers{'; log scale' if comps else ''})")
        if comps:
            ax.set_xscale("log")
            ax.legend(loc="lower right", fontsize=8)
        ax.invert_yaxis()
    env = record.get("environment", {})
    fig.suptitle(f"{record['benchmark']}{' (quick)' if record.get('quick') else ''}: {env.get('device', '')}, "
                 f"{env.get('cpu_count', '?')} cores, {env.get('commit', '')[:12]}, {env.get('date', '')[:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    code = _child_main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # The result is written: skip interpreter teardown, where a C++ thread left running
    # (gloo, OpenMP, FFCV, numba's TBB pool, DeepSpeed) can abort the process ("terminate
    # called without an active exception") and fail a finished job.
    os._exit(code)

"""What every benchmark shares: repetition, alternation, statistics, the environment,
child processes and multi-process jobs, and the JSON + PNG output. Its rules (warm-up,
every repetition kept, ABBA alternation): docs/benchmarks.md."""
from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


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
    if n <= 0:
        raise RuntimeError("a timed repetition handled no items")
    return n / max(time.perf_counter() - t0, 1e-9)


def alternate(sides: dict[str, Callable[[int], float]], reps: int, warmup: int = 1,
              seed: int | None = None) -> dict[str, list[float]]:
    """Each side's ``fn(rep) -> rate`` ``warmup`` times untimed (rep -1, -2, ...), then ``reps``
    timed rounds; the order within a round reverses every round (A B, B A, ...), or with
    ``seed`` (for more than two sides) is drawn afresh, seeded, every round."""
    names, order = list(sides), random.Random(seed)
    for w in range(warmup):
        for name in names:
            sides[name](-1 - w)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (order.sample(names, len(names)) if seed is not None else names if r % 2 == 0 else names[::-1]):
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
    """Hold torch's intra-op thread count at ``n`` (None: the engine's behaviour); returns
    the count in effect. FFCV resets it whenever a loader is built or an epoch starts, and
    DeepSpeed's CPU accelerator at start-up: the engine's patch narrows FFCV's hook."""
    import torch
    if n is None:
        return torch.get_num_threads()
    from engine.runtime.threads import neutralise_ffcv
    neutralise_ffcv()
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- child processes


def run_child(target_fn: str, kwargs: dict, *, timeout: float, world: int = 0, threads: int = 0,
              env: dict[str, str] | None = None):
    """``module:function(**kwargs)`` in a fresh interpreter; its (rank 0's) return value.
    ``world`` > 0 starts that many ranks, which find each other through the env://
    variables the engine reads. Each child runs in its own session, so a timeout stops it
    and whatever it started. ``env``: extra variables for the child alone."""
    from engine.runtime.launch import free_port
    with tempfile.TemporaryDirectory(prefix="dbd-bench-child-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"target": target_fn, "kwargs": kwargs, "out": str(out)}))
        base = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        base.update({"OMP_NUM_THREADS": str(threads)} if threads else {}, **(env or {}))
        if world:
            base.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            base.pop("TORCHELASTIC_RUN_ID", None)
        envs = [{**base, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(world)] if world else [base]
        procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.harness", str(job)], cwd=REPO, env=e,
                                  start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for e in envs]
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
            if not line.startswith((" ", "\t", "Traceback", "Exception ignored")):
                out.write("" if line.startswith("KeyError") else "".join(held))
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


# --------------------------------------------------------------------------- environment and output


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict:
    """Where the figures were measured: the machine, its load, the libraries, the commit."""
    import torch
    from engine.runtime.cost import commit, device_name
    cuda = torch.cuda.is_available()
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.node(), "platform": platform.platform(), "cpu_model": device_name("cpu"),
           "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
           "load_average_1_5_15": load_average(), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
           "cuda": torch.version.cuda if cuda else None, "gpu_count": torch.cuda.device_count() if cuda else 0,
           "python": platform.python_version(), "torch": torch.__version__, "commit": commit()}
    for dist in ("numpy", "torchvision", "ffcv", "numba", "deepspeed", "pillow"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    return env


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    try:
        return obj.item()  # numpy and torch scalars
    except (AttributeError, ValueError, TypeError):
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
    """Bars of medians with quartile whiskers, one panel per unit: engine and reference per
    comparison (log scale), or one bar per measurement for a benchmark without comparisons."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    comps = record.get("comparisons") or {}
    sides = ("engine", "reference") if comps else ("median",)
    # figure -> (unit, [(median, stats) per side])
    bars = ({k: (c["unit"], [(c[s], c.get(f"{s}_stats", {})) for s in sides]) for k, c in comps.items()} or
            {k: (m.get("unit", ""), [(m["median"], m)]) for k, m in (record.get("measurements") or {}).items()
             if isinstance(m.get("median"), (int, float))})
    if not bars:
        raise ValueError("nothing to plot")
    units = sorted({u for u, _ in bars.values()})
    fig, axes = plt.subplots(len(units), 1, figsize=(10, 1.0 + 0.5 * len(bars) + 0.8 * len(units)), squeeze=False)
    for ax, unit in zip(axes[:, 0], units):
        keys = [k for k, (u, _) in bars.items() if u == unit]
        height = 0.8 / len(sides)
        for j, (side, color) in enumerate(zip(sides, ("tab:blue", "tab:gray"))):
            vals = [bars[k][1][j] for k in keys]
            err = [[max(0.0, v - st.get("q1", v)) for v, st in vals], [max(0.0, st.get("q3", v) - v) for v, st in vals]]
            ax.barh([i + (j - (len(sides) - 1) / 2) * height for i in range(len(keys))], [v for v, _ in vals],
                    height=height, xerr=err, color=color, label=side)
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

"""Timing helpers every benchmark of the suite shares.

Rules they enforce: warm-up before timing (numba and torch compile, caches fill),
several repetitions with every one kept, medians with their spread, and comparisons
measured in one run with the two sides alternating (ABBA order), so a machine that
slows down or speeds up during the run affects both sides alike.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def summarize(values: list[float]) -> dict:
    """Median and spread (quartiles, min, max) of repetitions, every repetition kept."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("no repetitions to summarise")
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {"reps": vals, "median": statistics.median(vals), "q1": q1, "q3": q3,
            "min": min(vals), "max": max(vals)}


def rate(fn: Callable[[], int]) -> float:
    """Items per second of one call of ``fn`` (which returns how many items it handled)."""
    t0 = time.perf_counter()
    n = fn()
    dt = time.perf_counter() - t0
    if n <= 0:
        raise RuntimeError("a timed repetition handled no items")
    return n / max(dt, 1e-9)


def alternate(sides: dict[str, Callable[[int], float]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run each side's ``fn(rep) -> rate`` ``warmup`` times untimed, then ``reps`` timed
    rounds; the order within a round reverses every round (A B, B A, A B, ...)."""
    names = list(sides)
    for w in range(warmup):
        for name in names:
            sides[name](-1 - w)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
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


def pin_torch_threads(n: int | None) -> int:
    """Hold torch's intra-op thread count at ``n`` for the rest of the process.

    FFCV sets torch's thread count to its own loader thread count whenever a loader is
    built or an epoch starts, and DeepSpeed's CPU accelerator sets it to 1 at start-up,
    so an explicit choice must survive both: FFCV's hook is narrowed to numba's threads
    (its own decoding threads keep their number). ``None`` keeps the engine's behaviour.
    Returns the count in effect.
    """
    import torch

    if n is None:
        return torch.get_num_threads()
    from ffcv.pipeline.compiler import Compiler
    from numba import set_num_threads

    def numba_only(cls, k):
        k = k if k >= 1 else (os.cpu_count() or 1)  # FFCV's own rule for k < 1
        cls.num_threads = k
        set_num_threads(k)

    Compiler.set_num_threads = classmethod(numba_only)
    torch.set_num_threads(n)
    return n

"""The GPU check's schedule: each phase in a child process of its own under a cumulative
deadline, killed ``GRACE_S`` after it; DIR/gpu.json (atomically) and DIR/gpu.md rewritten
after every phase."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.gpu import distributed_phase
from benchmarks.gpu.common import CAPS, GRACE_S, PHASES, SIZES, ffcv_importable, mode
from benchmarks.gpu.render import markdown
from benchmarks.harness import environment, jsonable, measurement, run_child


def phase_status(value: dict) -> str:
    res = value.get("results") or {}
    if value.get("failed_runs") or any(isinstance(r, dict) and "error" in r for r in res.values()):
        return "errors"
    return "partial" if value.get("skipped") else "ok"


def measurements(phases: dict) -> dict:
    """The figures the suite's table and chart show (``python -m benchmarks --report``)."""
    out = {}
    for key, r in ((phases.get("views") or {}).get("results") or {}).items():
        if isinstance(r, dict) and r.get("reps"):
            out[f"views/{key}"] = measurement(r.get("unit", "views/s"), r["reps"])
    for key, r in ((phases.get("steps") or {}).get("results") or {}).items():
        if isinstance(r, dict) and r.get("images_per_s_by_step"):
            out[f"steps/{key}"] = measurement("images/s", r["images_per_s_by_step"],
                                              bf16_peak_share=r.get("bf16_peak_share"))
    return out


def _phase(name: str, smoke: bool, deadline: float, hard: float, progress: Path) -> tuple[dict, str]:
    """One phase's record and status, whatever happens to it."""
    try:
        if name == "distributed":  # its ranks are child processes already
            value = distributed_phase.run(smoke, deadline, str(progress), hard=hard)
        else:  # Triton reads TRITON_INTERPRET once, at import: the variable goes to the children.
            value = run_child(f"benchmarks.gpu.{name}_phase:run",
                              dict(smoke=smoke, deadline=deadline, progress=str(progress)),
                              timeout=max(5.0, hard - time.time()), env={"TRITON_INTERPRET": "1" if smoke else "0"})
        return value, phase_status(value)
    except Exception as e:
        value = json.loads(progress.read_text()) if progress.is_file() else {}
        value["error"] = f"{type(e).__name__}: {e}"
        return value, "timed_out" if "did not finish" in str(e) else "failed"


def run(quick: bool = False, device: str | None = None, out: str | None = None) -> dict:
    """Every phase in turn, DIR/gpu.json and DIR/gpu.md rewritten after each. ``quick``
    is the smoke run (CPU, whatever ``device``)."""
    from engine.fsutil import atomic_path, write_json
    smoke = bool(quick)
    name_ = mode(smoke)
    out_dir = Path(out or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    caps = CAPS[name_]
    record = {"benchmark": "gpu", "mode": name_, "quick": smoke, "environment": environment(),
              "ffcv_importable": ffcv_importable(),
              "budget": {"caps_s": caps, "grace_s": GRACE_S, "planned_limit_s": sum(caps.values()) + GRACE_S},
              "settings": {"mode": name_, "device_requested": device, "sizes": SIZES[name_]},
              "phases": {name: {"status": "pending"} for name in PHASES}}
    if not smoke:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: `python -m benchmarks gpu` needs one; `--smoke` runs its CPU path")

    def write() -> None:
        record["wall_seconds"] = time.time() - start
        record["measurements"] = measurements(record["phases"])
        write_json(out_dir / "gpu.json", jsonable(record))
        with atomic_path(out_dir / "gpu.md") as tmp:
            tmp.write_text(markdown(record))
    write()
    with tempfile.TemporaryDirectory(prefix="dbd-gpu-") as tmp:
        deadline = start
        for name in PHASES:
            deadline += caps[name]
            t0 = time.time()
            print(f"[gpu] {name}: deadline in {deadline - t0:.0f} s", flush=True)
            value, status = _phase(name, smoke, deadline, deadline + GRACE_S, Path(tmp) / f"{name}.json")
            value.update(status=status, seconds=round(time.time() - t0, 1), deadline_s=round(deadline - start, 1))
            record["phases"][name] = value
            write()
            print(f"[gpu] {name}: {status} in {value['seconds']} s", flush=True)
    write()
    return record

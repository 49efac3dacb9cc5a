"""The GPU check's schedule: the phases in turn under cumulative deadlines, each in a child
process of its own; DIR/gpu.json and DIR/gpu.md after each."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.gpu.plan import CAPS, GRACE_S, NO_CUDA, PHASES, SIZES, mode
from benchmarks.gpu.progress import ffcv_importable, saved_on_error
from benchmarks.gpu.render import markdown
from benchmarks.harness import environment, jsonable, measurement, run_child


def phase_status(value: dict) -> str:
    if "error" in value:  # the phase itself broke off: what it had saved is kept
        return "timed_out" if "did not finish" in value["error"] else "failed"
    if any("error" in r for r in value.get("results", {}).values()):
        return "errors"
    return "partial" if value.get("skipped") else "ok"


def measurements(phases: dict) -> dict:
    """The figures of the suite's table and chart (``python -m benchmarks --report``)."""
    views, steps = (phases[name].get("results", {}) for name in ("views", "steps"))
    return {**{f"views/{k}": measurement(r["unit"], r["reps"]) for k, r in views.items() if "reps" in r},
            **{f"steps/{k}": measurement("images/s", r["images_per_s_by_step"], bf16_peak_share=r["bf16_peak_share"])
               for k, r in steps.items() if "images_per_s_by_step" in r}}


def run_phase(name: str, smoke: bool, deadline: float, saved: Path) -> dict:
    """Phase ``name`` in a child, killed ``GRACE_S`` past its deadline; what it saved if it fails.
    Triton reads TRITON_INTERPRET once, at import: the variable goes to the child."""
    return saved_on_error(lambda: run_child(
        f"benchmarks.gpu.{name}_phase:run", dict(smoke=smoke, deadline=deadline, progress=str(saved)),
        timeout=max(5.0, deadline + GRACE_S - time.time()), env={"TRITON_INTERPRET": "1" if smoke else "0"}), saved)


def run(quick: bool = False, device: str | None = None, out: str | None = None) -> dict:
    """Every phase in turn; ``quick`` is the smoke run (on the CPU, whatever ``device``)."""
    import torch
    from engine.fsutil import atomic_path, write_json
    smoke, name = bool(quick), mode(quick)
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    out_dir, start, caps = Path(out or "benchmarks/results"), time.time(), CAPS[name]
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "gpu", "mode": name, "quick": smoke, "environment": environment(),
              "ffcv_importable": ffcv_importable(),
              "budget": {"caps_s": caps, "grace_s": GRACE_S, "planned_limit_s": sum(caps.values()) + GRACE_S},
              "settings": {"mode": name, "device_requested": device, "sizes": SIZES[name]},
              "phases": {phase: {"status": "pending"} for phase in PHASES}}

    def write() -> None:
        record.update(wall_seconds=time.time() - start, measurements=measurements(record["phases"]))
        write_json(out_dir / "gpu.json", jsonable(record))
        with atomic_path(out_dir / "gpu.md") as tmp:
            tmp.write_text(markdown(record))
    write()
    deadline = start
    with tempfile.TemporaryDirectory(prefix="dbd-gpu-") as tmp:
        for phase in PHASES:
            deadline, t0 = deadline + caps[phase], time.time()
            print(f"[gpu] {phase}: deadline in {deadline - t0:.0f} s", flush=True)
            value = run_phase(phase, smoke, deadline, Path(tmp) / f"{phase}.json")
            value.update(status=phase_status(value), seconds=round(time.time() - t0, 1),
                         deadline_s=round(deadline - start, 1))
            record["phases"][phase] = value
            write()
            print(f"[gpu] {phase}: {value['status']} in {value['seconds']} s", flush=True)
    return record

"""The GPU check's plan, read from plan.yaml beside this module: its phases in order,
their time caps and sizes, and what only CUDA can show (the smoke run's notes)."""
from __future__ import annotations

from pathlib import Path

import yaml

PLAN = yaml.safe_load(Path(__file__).with_name("plan.yaml").read_text())
GRACE_S = PLAN["grace_s"]
CAPS = {mode: PLAN[mode]["caps"] for mode in ("full", "smoke")}
PHASES = tuple(CAPS["full"])
SIZES = {mode: {k: v for k, v in PLAN[mode].items() if k not in ("caps", "cuda_only")} for mode in CAPS}
NO_CUDA = "no CUDA device: `python -m benchmarks gpu` needs one (--smoke runs its CPU path)"


def mode(smoke: bool) -> str:
    return "smoke" if smoke else "full"


def cuda_only(phase: str, smoke: bool) -> dict:
    return dict(PLAN["smoke"]["cuda_only"][phase]) if smoke else {}


def device(smoke: bool):
    import torch
    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    return torch.device("cuda", 0)


def checked_stages() -> tuple[str, ...]:
    """Every registered stage, each after those it needs: a new defense's stages are
    checked without editing this package."""
    from engine.stages.base import stages_in_order
    return stages_in_order()

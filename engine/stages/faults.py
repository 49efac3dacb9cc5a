"""Fault injection for the resume and failure tests (read from the environment, never
from the config).

``DBD_FAULT_EXIT_AT_STEP=STEP[:RANK[:MODE]]`` makes rank RANK (default 0), just before
global step STEP (0-based), ``exit`` with status 13 (default), ``kill`` itself with
SIGKILL, or ``hang`` forever. It fires once per stage folder (a marker file records
it), so a restarted or rerun job carries on past it.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from engine.errors import UserError

FAULT_ENV = "DBD_FAULT_EXIT_AT_STEP"


def parse_fault(spec: str):
    spec = spec.strip()
    if not spec:
        return None
    parts = spec.split(":")
    try:
        step = int(parts[0])
        rank = int(parts[1]) if len(parts) > 1 and parts[1] else 0
    except ValueError:
        raise UserError(f"{FAULT_ENV}={spec!r} must look like STEP[:RANK[:exit|kill|hang]]") from None
    mode = parts[2] if len(parts) > 2 else "exit"
    if mode not in ("exit", "kill", "hang"):
        raise UserError(f"{FAULT_ENV}={spec!r}: mode must be exit, kill or hang")
    return step, rank, mode


def maybe_fault(fault, global_step: int, rank: int, stage_dir: Path) -> None:
    step, want_rank, mode = fault
    if global_step != step or rank != want_rank:
        return
    marker = stage_dir / f".fault-{step}-{rank}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(mode)
    print(f"[rank {rank}] {FAULT_ENV}: injected fault '{mode}' at step {step}", flush=True)
    if mode == "exit":
        os._exit(13)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)

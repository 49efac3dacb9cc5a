"""Running the real launchers on a tiny SimCLR config, and reading back what they wrote."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from engine.runtime.launch import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Width-8 ResNet, 2 epochs x 4 steps of a 32-image global batch, a checkpoint every 2
# steps: small enough for 2 cores, long enough to resume mid-epoch. One torch thread per
# process under every launcher: the thread count changes float rounding on CPU, and the
# launchers are compared at equal arithmetic (the default, cores per local rank, gives a
# 1-process run 2 threads and each of 2 ranks 1 here). Width 8: narrower nets take the
# NCHW path for their 1x1 shortcut on CPU (engine/models/resnet.py), where 1 and 2
# processes part beyond the tight first-step tolerance on an AVX2-only CPU.
TINY = {
    "runtime": {"threads": 1},
    "stages": ["pretrain"],
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "num_workers": 1, "horizontal_flip": False},
    "attack": {"name": "none"},
    "model": {"arch": "cifar_resnet18", "width": 8, "proj_hidden": 32, "proj_dim": 16},
    "pretrain": {"epochs": 2, "schedule_epochs": 10, "iterations_per_epoch": 4, "batch_size": 32},
    "distributed": {"checkpoint_every": 2, "timeout_s": 60},
    # No feature sample nor t-SNE map per stage: 6 of a 15 s launcher run on 2 cores (test_pipeline
    # and the store tests keep them).
    "logging": {"progress": False, "log_every": 1, "feature_map": False},
}
STEPS = 8

# Variables a launcher sets: a test run inside some launcher must not leak them.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
                  "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_PROCID",
                  "SLURM_STEP_NUM_TASKS")


def write_config(tmp: Path, root: Path, name: str = "cfg", **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(root)
    cfg["run_dir"] = str(tmp / f"run-{name}")
    for key, value in changes.items():
        node = cfg
        *head, last = key.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_dir(config: Path) -> Path:
    return Path(yaml.safe_load(config.read_text())["run_dir"])


def env(**extra: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    e.update(
        PATH=f"{BIN}{os.pathsep}{e.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        # DeepSpeed JIT-builds a CPU communication op once (about a minute); a cache of
        # our own keeps other projects' builds with other flags from evicting it.
        TORCH_EXTENSIONS_DIR=e.get("DBD_TEST_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dbd-torch-extensions")),
    )
    e.update(extra)
    return e


def run(cmd: list, *, timeout: int = 420, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)


def dbd_cmd(config: Path, *overrides: str) -> list:
    return [sys.executable, "-m", "engine", "run", config, *overrides]


def torchrun_cmd(*args: str) -> list:
    return [BIN / "torchrun", *args]


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                                  f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def killed_and_resumed(tmp: Path, root: Path, fault: str, **changes) -> subprocess.CompletedProcess:
    """One config run uninterrupted (``run-whole``) and again (``run-killed``) with a SIGKILL
    at ``fault`` (``DBD_FAULT_EXIT_AT_STEP``), then rerun to the end; the rerun's process."""
    check(run(dbd_cmd(write_config(tmp, root, "whole", **changes))))
    killed = write_config(tmp, root, "killed", **changes)
    first = run(dbd_cmd(killed), DBD_FAULT_EXIT_AT_STEP=fault)
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = check(run(dbd_cmd(killed)))
    assert "resuming from" in second.stdout
    return second


def losses(rdir: Path) -> dict[int, float]:
    """Per-step loss of the pretrain stage (the last record wins after a resume)."""
    return dict(step_records(rdir))


def step_records(rdir: Path) -> list[tuple[int, float]]:
    """Every (global_step, loss) record in order, the repeats of a resumed run included."""
    out = []
    for line in (rdir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "step" and rec.get("stage") == "pretrain":
            out.append((int(rec["global_step"]), float(rec["loss"])))
    return out


def assert_trajectory(got: dict, want: dict, *, first_tol: float, tol: float, first: int = 2) -> None:
    """Same steps; the first ``first`` within ``first_tol``, the rest within ``tol``.

    fp32 on this tiny net is chaotic: the same steps in float64 agree to 1e-13 between 1
    and 2 processes, but fp32 rounding differences (a different summation order) grow to
    about 1e-3 within eight steps. The first steps are compared tightly, where a real
    error (a gradient off by the world size, a wrong shard, unsynchronised BatchNorm)
    shows at once.
    """
    assert sorted(got) == sorted(want) == list(range(STEPS)), (sorted(got), sorted(want))
    for s in sorted(want):
        bound = first_tol if s < first else tol
        assert abs(got[s] - want[s]) <= bound, f"step {s}: {got[s]} vs {want[s]} (tolerance {bound})"


def final_state(rdir: Path) -> dict:
    import torch

    return torch.load(rdir / "pretrain" / "model.pt", map_location="cpu", weights_only=True)


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())

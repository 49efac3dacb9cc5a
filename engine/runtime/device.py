"""Which GPU a process takes, which process-group backend it uses, how CUDA is tuned.

Pure functions of the launcher's environment and the number of visible GPUs, so that
every launcher layout is testable without a GPU:

- :func:`local_layout`: this process's local rank and the number of processes on its
  node, as its launcher states them (torchrun, the deepspeed launcher, Open MPI,
  MPICH/Intel MPI, PMIx, SLURM);
- :func:`gpu_index`: the CUDA index among the visible devices. With at least one
  visible GPU per local process, local rank r takes GPU r (torchrun, deepspeed, srun
  with every GPU of the node visible). With fewer, the processes share them in turn,
  r mod V: one visible GPU per process (``srun --gpus-per-task 1``, or any per-rank
  ``CUDA_VISIBLE_DEVICES``) is index 0 everywhere, and several processes may share one
  GPU on purpose (``distributed.process_group: gloo``). A count that does not divide
  evenly is refused: it would leave some GPUs with more processes than others.
- :func:`resolve_process_group`: ``distributed.process_group`` (auto | nccl | gloo)
  against the device;
- :func:`apply_cuda_settings`: cuDNN autotuning and TF32 (``distributed.cudnn_benchmark``,
  ``distributed.tf32``), on CUDA only.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from engine.errors import UserError


@dataclass(frozen=True)
class LocalLayout:
    local_rank: int
    local_world_size: int | None  # processes on this node; None when the launcher does not say


def detect_launcher(env: Mapping[str, str] | None = None) -> str:
    """single | torchrun | deepspeed | env | mpi | slurm, from the launcher's variables."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        if "TORCHELASTIC_RUN_ID" in env:
            return "torchrun"
        # deepspeed's launch.py is the only common launcher that exports CROSS_RANK.
        return "deepspeed" if "CROSS_RANK" in env else "env"
    # mpirun inside a SLURM allocation inherits SLURM_* of the batch step: MPI first.
    if "OMPI_COMM_WORLD_SIZE" in env:
        return "mpi"
    # SLURM_STEP_NUM_TASKS exists only inside an srun step, not in the batch script.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return "slurm"
    if "PMI_SIZE" in env or "PMIX_RANK" in env:
        return "mpi"  # MPICH / Intel MPI (hydra) or a PMIx launcher
    return "single"


def int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise UserError(f"launcher environment is missing {name}")
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"launcher environment variable {name}={value!r} is not an integer") from None


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in env:
            return int_var(env, name)
    return None


def slurm_tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """Entry ``node`` of SLURM's compressed per-node task counts, e.g. ``"4(x2),3"``."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if 0 <= node < len(counts):
        return counts[node]
    # A step on a subset of the job's nodes numbers them differently; equal counts still tell.
    return counts[0] if counts and len(set(counts)) == 1 else None


# Each MPI flavour's own names for the local rank and the processes on the node.
_MPI_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK", "PALS_LOCAL_RANKID")
_MPI_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE", "PALS_LOCAL_SIZE")


def local_layout(env: Mapping[str, str], launcher: str | None = None) -> LocalLayout:
    """This process's local rank and its node's process count, as ``launcher`` (detected
    from ``env`` when None) exports them. (The MPI branch of ``init_distributed`` takes
    both from mpi4py instead, which every MPI implementation answers.)"""
    launcher = launcher or detect_launcher(env)
    if launcher in ("torchrun", "deepspeed", "env"):
        # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE.
        return LocalLayout(int_var(env, "LOCAL_RANK", 0), _first(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE")))
    if launcher == "mpi":
        rank = _first(env, _MPI_LOCAL_RANK)
        return LocalLayout(0 if rank is None else rank, _first(env, _MPI_LOCAL_SIZE))
    if launcher == "slurm":
        size = None
        if "SLURM_STEP_TASKS_PER_NODE" in env:
            size = slurm_tasks_on_node(env["SLURM_STEP_TASKS_PER_NODE"], int_var(env, "SLURM_NODEID", 0))
        if size is None and "SLURM_NTASKS_PER_NODE" in env:
            size = int_var(env, "SLURM_NTASKS_PER_NODE")
        return LocalLayout(int_var(env, "SLURM_LOCALID", 0), size)
    return LocalLayout(0, 1)


def gpu_index(local_rank: int, local_world_size: int | None, visible: int) -> int:
    """The CUDA index (among the ``visible`` devices) for this local process."""
    if visible < 1:
        raise UserError("device=cuda but no CUDA device is visible (set device=cpu or auto)")
    if local_rank < 0 or (local_world_size is not None and not 0 <= local_rank < local_world_size):
        raise UserError(f"launcher gave local rank {local_rank} outside the {local_world_size} processes "
                        f"of this node")
    if local_world_size is None:
        # The node's process count is unknown: only the two unambiguous cases.
        if local_rank < visible:
            return local_rank
        if visible == 1:
            return 0
        raise UserError(f"local rank {local_rank} sees {visible} GPUs and its launcher does not say how many "
                        f"processes share this node: export LOCAL_WORLD_SIZE, or give each process one GPU "
                        f"(CUDA_VISIBLE_DEVICES)")
    if visible >= local_world_size:
        return local_rank
    if local_world_size % visible == 0:
        return local_rank % visible
    raise UserError(f"{local_world_size} processes on this node see {visible} GPUs each, which does not divide "
                    f"evenly: give each process its own GPU (srun --gpus-per-task 1, or CUDA_VISIBLE_DEVICES), "
                    f"make one GPU per process visible, or start a multiple of {visible} processes per node")


def device_index(env: Mapping[str, str], visible: int) -> int:
    """The CUDA index this process takes under the launcher that ``env`` describes."""
    layout = local_layout(env)
    return gpu_index(layout.local_rank, layout.local_world_size, visible)


PROCESS_GROUPS = ("auto", "nccl", "gloo")


def resolve_process_group(want: str, device: torch.device) -> str:
    """``distributed.process_group`` for this device: auto is NCCL on CUDA, gloo on CPU.

    gloo on CUDA lets several processes share one GPU (NCCL refuses two ranks on one
    device), e.g. to check multi-process behaviour on a single GPU; it is slower than NCCL."""
    if want not in PROCESS_GROUPS:
        raise UserError(f"config: distributed.process_group {want!r} is unknown: must be auto, nccl or gloo")
    if want == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if want == "nccl":
        if device.type != "cuda":
            raise UserError(f"distributed.process_group=nccl needs CUDA devices but this run is on "
                            f"{device.type}: use gloo (or auto)")
        if not torch.distributed.is_nccl_available():
            raise UserError("distributed.process_group=nccl but this torch build has no NCCL: use gloo")
    return want


def apply_cuda_settings(device: torch.device, *, cudnn_benchmark: bool, tf32: bool) -> None:
    """cuDNN autotuning and TF32 for a CUDA run; a CPU run leaves every flag as it is.

    Every stage's shapes are fixed, so cuDNN's benchmark mode measures its algorithms
    once per shape and keeps the fastest (its choice may differ between runs, so runs
    are no longer bitwise repeatable). TF32 runs fp32 matmuls and convolutions on tensor
    cores with a 10-bit mantissa (Ampere and later): fast, but not fp32 numerics, so
    ``tf32=False`` turns it off for both, for experiments that must be fp32 throughout."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)

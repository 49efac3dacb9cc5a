"""One entry point for every launcher: detect who started us, initialise torch.distributed.

Supported, all unmodified: plain ``python``/``dbd`` (one process), ``torchrun``, the
``deepspeed`` launcher (its local ``launch.py`` exports torchrun-style variables; its
``--launcher openmpi|mpich|slurm`` modes start ranks through mpirun/srun and land in
the MPI or SLURM branch), ``mpirun`` (rank, size and local rank from mpi4py, master
address and port chosen by rank 0 and broadcast) and ``srun`` (SLURM variables).

A dead or failing rank must end the job, never hang it. Three mechanisms cover it:
every launcher here tears the job down when one rank exits non-zero (``srun`` needs
``--kill-on-bad-exit=1``, see engine/runtime/README.md); a peer that vanishes makes
gloo collectives fail at once (closed socket); a peer that is alive but stuck is caught
by the process-group timeout (``distributed.timeout_s``), enforced on NCCL by the
watchdog with asynchronous error handling forced on.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch

from engine.errors import UserError
from engine.runtime.device import (apply_cuda_settings, detect_launcher, gpu_index, int_var, local_layout,
                                   resolve_process_group)
from engine.runtime.threads import configure as configure_threads


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    pg_backend: str | None  # the process group's torch.distributed backend (nccl/gloo), None without one
    launcher: str  # single | torchrun | deepspeed | env | mpi | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.pg_backend is not None

    # ---- collectives: every rank calls them, in the same order.
    @property
    def collective_device(self) -> torch.device:
        """Where tensors must be for this process group: gloo reduces CPU tensors, NCCL
        device tensors. The one place that rule is decided."""
        return self.device if self.pg_backend == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks, returned on ``t``'s own device (``t`` itself alone)."""
        if self.world_size == 1:
            return t
        import torch.distributed as tdist

        out = t.to(self.collective_device)
        tdist.all_reduce(out)
        return out.to(t.device)

    def mean_over_ranks(self, values: dict) -> dict[str, float]:
        """Average each scalar (float or 0-d tensor) over ranks in one collective; plain floats."""
        if not values:
            return {}
        keys = sorted(values)
        device = self.collective_device
        vec = torch.stack([values[k].detach().to(device, torch.float64).reshape(()) if torch.is_tensor(values[k])
                           else torch.as_tensor(values[k], dtype=torch.float64, device=device).reshape(())
                           for k in keys])
        if self.world_size > 1:
            torch.distributed.all_reduce(vec)
            vec = vec / self.world_size
        return {k: float(v) for k, v in zip(keys, vec.tolist())}

    def all_true(self, ok: bool) -> bool:
        """Whether ``ok`` holds on every rank."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], device=self.collective_device)
        torch.distributed.all_reduce(flag)
        return int(flag.item()) == 0


_INFO: DistInfo | None = None


# --------------------------------------------------------------------------- detection


@dataclass
class _Env:
    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: str | None = None
    local_world_size: int | None = 1  # processes on this node (None: the launcher does not say)


def _int_env(name: str, default: int | None = None) -> int:
    return int_var(os.environ, name, default)


def _from_env(launcher: str) -> _Env:
    layout = local_layout(os.environ, launcher)
    return _Env(launcher, _int_env("RANK"), _int_env("WORLD_SIZE"), layout.local_rank,
                os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), layout.local_world_size)


def free_port() -> int:
    """A TCP port free on this host now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _routable_address() -> str:
    # The address other hosts reach us at: the interface the default route uses.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _from_mpi() -> _Env:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UserError(f"started by an MPI launcher but mpi4py is not importable: {e}") from None
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    single_host = world.allreduce(local_size, op=MPI.MIN) == size
    addr = port = None
    if rank == 0:
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if single_host else _routable_address())
        port = os.environ.get("MASTER_PORT") or str(free_port())
    addr, port = world.bcast((addr, port), root=0)
    return _Env("mpi", rank, size, local_rank, addr, port, local_size)


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Without scontrol: expand the first entry of "prefix[a-b,c],other" by hand.
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^(.*?)\[([^\]]+)\](.*)$", first)
    if not m:
        return first
    lo = m.group(2).split(",")[0].split("-")[0]
    return f"{m.group(1)}{lo}{m.group(3)}"


def _from_slurm() -> _Env:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    addr = os.environ.get("MASTER_ADDR") or _first_slurm_host(nodelist)
    # Every rank derives the same port from the job id, with no communication needed.
    port = os.environ.get("MASTER_PORT") or str(20000 + _int_env("SLURM_JOB_ID", 0) % 20000)
    world = _int_env("SLURM_STEP_NUM_TASKS", _int_env("SLURM_NTASKS", 1))
    layout = local_layout(os.environ, "slurm")
    return _Env("slurm", _int_env("SLURM_PROCID"), world, layout.local_rank, addr, port, layout.local_world_size)


def _discover() -> _Env:
    launcher = detect_launcher()
    if launcher in ("torchrun", "deepspeed", "env"):
        return _from_env(launcher)
    if launcher == "mpi":
        return _from_mpi()
    if launcher == "slurm":
        return _from_slurm()
    return _Env("single", 0, 1, 0)


def launcher_rank() -> int:
    """This process's rank as its launcher's variables give it, before any process group
    exists (0 for a single process, or where the launcher's variables are incomplete)."""
    try:
        return _discover().rank
    except UserError:
        return 0


# --------------------------------------------------------------------------- init


def _pick_device(want: str, local_rank: int, local_world_size: int | None) -> torch.device:
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is visible (set device=cpu or auto)")
    # Per-process visibility (srun --gpus-per-task 1) shows each process only its own GPUs.
    return torch.device("cuda", gpu_index(local_rank, local_world_size, torch.cuda.device_count()))


def init_distributed(device: str, distributed, runtime=None) -> DistInfo:
    """Detect the launcher, create the process group, pin the device, set torch's CPU
    threads. Idempotent: the first call of a process decides.

    ``device`` is the config's ``device`` (auto | cpu | cuda); ``distributed`` its
    ``distributed`` section (engine, process group, timeout, CUDA tuning); ``runtime``
    its ``runtime`` section (torch's intra-op threads; None: its defaults, the cores per
    local rank)."""
    global _INFO
    if _INFO is not None:
        return _INFO
    env = _discover()
    if not 0 <= env.rank < env.world_size:
        raise UserError(f"launcher gave rank {env.rank} outside world size {env.world_size}")
    # Libraries initialised later read these. LOCAL_RANK stays the launcher's local rank
    # (DeepSpeed asserts it equals OMPI_COMM_WORLD_LOCAL_RANK under Open MPI); the GPU
    # index, which differs from it under per-process visibility, reaches DeepSpeed as
    # its device_rank (engine.runtime.backends) and torch through set_device below.
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
    device = _pick_device(device, env.local_rank, env.local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        apply_cuda_settings(device, cudnn_benchmark=distributed.cudnn_benchmark, tf32=distributed.tf32)
    # Checked on every run, so that nccl on a CPU fails alike with or without a group.
    group_backend = resolve_process_group(distributed.process_group, device)
    # Some engines (DeepSpeed) need a process group even for one process; DDP does not.
    from engine.runtime.backends import ENGINES

    engine = ENGINES.lookup(distributed.engine, "distributed.engine")
    need_group = env.world_size > 1 or engine.needs_process_group
    backend = None
    if need_group:
        backend = group_backend
        timeout = datetime.timedelta(seconds=distributed.timeout_s)
        if backend == "nccl":
            # The NCCL watchdog tears the process down when a collective times out,
            # instead of leaving it blocked on a stream forever.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if env.world_size == 1 and not env.master_addr:
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                                 world_size=1, timeout=timeout)
        else:
            if not env.master_addr or not env.master_port:
                raise UserError(f"{env.launcher} launch without MASTER_ADDR/MASTER_PORT: cannot rendezvous")
            os.environ.update(MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
            kwargs = {"device_id": device} if backend == "nccl" else {}
            store, _, _ = next(torch.distributed.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
            # torchrun --max-restarts reuses its agent's store across attempts: without a
            # per-attempt prefix a fast new rank reads a dead rank's gloo address left
            # there by the previous attempt and fails to connect.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = torch.distributed.PrefixStore(f"/dbd/attempt_{attempt}", store)
            torch.distributed.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                                 timeout=timeout, **kwargs)
    # Once per process, with the group up: torch's intra-op threads (the engine's, not
    # FFCV's; engine.runtime.threads), from the ranks on this node.
    threads = configure_threads(runtime, env.local_world_size)
    _INFO = DistInfo(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank, device=device,
                     pg_backend=backend, launcher=env.launcher)
    if env.rank == 0 and env.world_size > 1:
        print(f"[dist] launcher={env.launcher} world_size={env.world_size} backend={backend} "
              f"device={device.type} master={env.master_addr}:{env.master_port} "
              f"torch_threads={threads} per rank ({env.local_world_size} ranks on this node)", flush=True)
    return _INFO


def current() -> DistInfo | None:
    return _INFO


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def shutdown() -> None:
    """Destroy the process group (interpreter shutdown with a live one can crash)."""
    global _INFO
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _INFO = None

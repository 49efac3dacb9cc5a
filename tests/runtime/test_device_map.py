"""Which GPU each process takes, the process-group choice and the CUDA flags.

The mapping is a pure function of the launcher's environment and the number of
visible GPUs (engine.runtime.device), so each launcher's layout is written out here as
that launcher exports it; the real torchrun, mpirun and deepspeed launchers then show
that those are the variables they set.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from engine.config import load_config
from engine.errors import UserError
from engine.runtime import launch
from engine.runtime.backends import deepspeed_args
from engine.runtime.device import (apply_cuda_settings, device_index, gpu_index, local_layout,
                                   resolve_process_group, slurm_tasks_on_node)
from tests.runtime.helpers import BIN, check, free_port, run


def _torchrun(local_rank, nproc, **extra):
    return {"RANK": str(local_rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(nproc), "TORCHELASTIC_RUN_ID": "job", "MASTER_ADDR": "h", "MASTER_PORT": "1",
            **extra}


def _srun(procid, localid, tasks_per_node="4(x2)", nodeid=1, ntasks=8):
    return {"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_NODEID": str(nodeid), "SLURM_JOB_ID": "77"}


def _ompi(rank, local_rank, local_size, size=4, **extra):
    return {"OMPI_COMM_WORLD_SIZE": str(size), "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank), "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size), **extra}


@pytest.mark.parametrize("env, visible, want", [
    # torchrun, one GPU per process: local rank r takes GPU r.
    (_torchrun(3, 4), 4, 3),
    (_torchrun(1, 2), 8, 1),
    # torchrun, two processes sharing one GPU (distributed.process_group=gloo).
    (_torchrun(1, 2), 1, 0),
    # srun --gpus-per-task 1: every task sees only its own GPU.
    (_srun(5, 1), 1, 0),
    (_srun(7, 3), 1, 0),
    # srun with every GPU of the node visible to every task.
    (_srun(5, 1), 4, 1),
    (_srun(7, 3), 4, 3),
    # srun with uneven nodes ("2,1"): node 1 runs one task.
    (_srun(2, 0, tasks_per_node="2,1", nodeid=1, ntasks=3), 1, 0),
    # mpirun, all GPUs visible / one per rank (a per-rank CUDA_VISIBLE_DEVICES wrapper).
    (_ompi(3, 1, 2), 2, 1),
    (_ompi(3, 1, 2), 1, 0),
    # mpirun inside a SLURM allocation: Open MPI's variables, not the batch step's.
    (_ompi(1, 1, 2, size=2, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_STEP_NUM_TASKS="1"), 2, 1),
    # MPICH / Intel MPI (hydra).
    ({"PMI_SIZE": "4", "PMI_RANK": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, 2, 1),
    # the deepspeed launcher: LOCAL_RANK and LOCAL_SIZE, and CROSS_RANK names it.
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8", "CROSS_RANK": "1"}, 8, 1),
    ({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8", "CROSS_RANK": "1"}, 1, 0),
    # one process.
    ({}, 1, 0),
    ({}, 8, 0),
], ids=["torchrun", "torchrun-more-gpus", "torchrun-shared-gpu", "srun-gpus-per-task", "srun-gpus-per-task-last",
        "srun-node-gpus", "srun-node-gpus-last", "srun-uneven", "mpirun", "mpirun-per-rank", "mpirun-in-slurm",
        "mpich", "deepspeed", "deepspeed-per-rank", "single", "single-many"])
def test_device_index_for_each_launcher(env, visible, want):
    assert device_index(env, visible) == want


@pytest.mark.parametrize("env, launcher, layout", [
    (_torchrun(3, 4), "torchrun", (3, 4)),
    (_srun(7, 3), "slurm", (3, 4)),
    (_srun(2, 0, tasks_per_node="2,1", nodeid=1, ntasks=3), "slurm", (0, 1)),
    ({**_srun(1, 1), "SLURM_STEP_TASKS_PER_NODE": "junk", "SLURM_NTASKS_PER_NODE": "2"}, "slurm", (1, 2)),
    (_ompi(3, 1, 2), "mpi", (1, 2)),
    ({"PMIX_RANK": "2", "PMIX_LOCAL_RANK": "0", "PMIX_LOCAL_SIZE": "2"}, "mpi", (0, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "0"}, "deepspeed", (1, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "env", (1, None)),
    ({}, "single", (0, 1)),
])
def test_local_layout(env, launcher, layout):
    from engine.runtime.device import detect_launcher

    assert detect_launcher(env) == launcher
    got = local_layout(env)
    assert (got.local_rank, got.local_world_size) == layout


def test_slurm_task_counts():
    assert [slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    assert slurm_tasks_on_node("8(x4)", 9) == 8  # a step numbered apart from the job: equal counts still tell
    assert slurm_tasks_on_node("2,1", 5) is None and slurm_tasks_on_node("x", 0) is None


@pytest.mark.parametrize("local_rank, local_size, visible, message", [
    (2, 3, 2, "3 processes on this node see 2 GPUs each, which does not divide evenly"),
    (1, 4, 0, "no CUDA device is visible"),
    (4, 4, 4, "local rank 4 outside the 4 processes"),
    (3, None, 2, "does not say how many processes share this node"),
])
def test_impossible_mappings_are_one_clear_error(local_rank, local_size, visible, message):
    with pytest.raises(UserError, match=message):
        gpu_index(local_rank, local_size, visible)


def test_unknown_local_size_maps_only_the_unambiguous_cases():
    assert gpu_index(1, None, 4) == 1  # enough GPUs for this rank
    assert gpu_index(5, None, 1) == 0  # one GPU: this process's own, or shared on purpose


def test_a_bad_launcher_variable_is_named():
    with pytest.raises(UserError, match="LOCAL_WORLD_SIZE='two' is not an integer"):
        device_index({**_torchrun(0, 2), "LOCAL_WORLD_SIZE": "two"}, 2)


def test_deepspeed_gets_the_mapped_gpu_not_the_local_rank():
    # srun --gpus-per-task 1, local rank 3: the one visible GPU is index 0.
    dist = launch.DistInfo(rank=7, world_size=8, local_rank=3, device=torch.device("cuda", 0), pg_backend="nccl",
                           launcher="slurm")
    assert deepspeed_args(dist).device_rank == 0
    cpu = launch.DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"), pg_backend="gloo",
                          launcher="torchrun")
    assert deepspeed_args(cpu).device_rank == 1  # DeepSpeed's own default on CPU, unchanged


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "deepspeed"])
def test_real_launchers_export_what_the_mapping_reads(tmp_path, launcher):
    probe = [sys.executable, "-m", "tests.runtime.layout_probe", tmp_path]
    if launcher == "torchrun":
        cmd = [BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "-m",
               "tests.runtime.layout_probe", tmp_path]
    elif launcher == "mpirun":
        cmd = [BIN / "mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root", *probe]
    else:
        cmd = [BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module",
               "tests.runtime.layout_probe", tmp_path]
    check(run(cmd, timeout=180))
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    want = {"torchrun": "torchrun", "mpirun": "mpi", "deepspeed": "deepspeed"}[launcher]
    for r, rec in enumerate(records):
        assert rec == {"launcher": want, "local_rank": r, "local_world_size": 2,
                       "index_one_visible": 0, "index_all_visible": r}, rec


# --------------------------------------------------------------------------- process group


@pytest.mark.parametrize("want, device, got", [
    ("auto", "cpu", "gloo"), ("auto", "cuda", "nccl"), ("gloo", "cuda", "gloo"), ("gloo", "cpu", "gloo"),
])
def test_process_group_choice(want, device, got):
    if got == "nccl" and not torch.distributed.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    assert resolve_process_group(want, torch.device(device, 0) if device == "cuda" else torch.device(device)) == got


def test_process_group_refusals(monkeypatch):
    with pytest.raises(UserError, match="process_group=nccl needs CUDA devices but this run is on cpu"):
        resolve_process_group("nccl", torch.device("cpu"))
    with pytest.raises(UserError, match="config: distributed.process_group unknown process group 'mpi'"):
        load_config(None, ["distributed.process_group=mpi"])
    # The run itself refuses it too, with or without a process group to create.
    for v in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(v, raising=False)
    cfg = load_config(None, ["device=cpu", "distributed.process_group=nccl"])
    try:
        with pytest.raises(UserError, match="process_group=nccl needs CUDA"):
            launch.init_distributed(cfg.device, cfg.distributed)
    finally:
        launch.shutdown()


# --------------------------------------------------------------------------- CUDA flags


@pytest.fixture
def cuda_flags():
    names = [(torch.backends.cudnn, "benchmark"), (torch.backends.cuda.matmul, "allow_tf32"),
             (torch.backends.cudnn, "allow_tf32")]
    saved = [getattr(o, n) for o, n in names]
    try:
        yield lambda: tuple(getattr(o, n) for o, n in names)
    finally:
        for (o, n), v in zip(names, saved):
            setattr(o, n, v)


def _set(benchmark: bool, tf32: bool) -> None:
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def test_cuda_settings_are_applied_on_cuda(cuda_flags):
    cfg = load_config(None, [])
    assert (cfg.distributed.cudnn_benchmark, cfg.distributed.tf32) == (True, True)  # the defaults
    _set(False, False)
    apply_cuda_settings(torch.device("cuda", 0), cudnn_benchmark=True, tf32=True)
    assert cuda_flags() == (True, True, True)
    assert torch.get_float32_matmul_precision() == "high"
    # tf32=false: fp32 numerics for matmuls and convolutions alike (the reference's fp32).
    apply_cuda_settings(torch.device("cuda", 0), cudnn_benchmark=False, tf32=False)
    assert cuda_flags() == (False, False, False)
    assert torch.get_float32_matmul_precision() == "highest"


def test_cuda_settings_leave_a_cpu_run_alone(cuda_flags, monkeypatch):
    _set(False, False)
    apply_cuda_settings(torch.device("cpu"), cudnn_benchmark=True, tf32=True)
    assert cuda_flags() == (False, False, False)
    _set(True, True)
    apply_cuda_settings(torch.device("cpu"), cudnn_benchmark=False, tf32=False)
    assert cuda_flags() == (True, True, True)
    # And so does a CPU run's start-up, whatever the config asks.
    for v in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(v, raising=False)
    cfg = load_config(None, ["device=cpu", "distributed.tf32=false", "distributed.cudnn_benchmark=false"])
    try:
        launch.init_distributed(cfg.device, cfg.distributed)
    finally:
        launch.shutdown()
    assert cuda_flags() == (True, True, True)

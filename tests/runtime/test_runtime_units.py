"""In-process pieces of the runtime: launcher detection, batch plans, checkpoints, SyncBN, LARS."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.errors import UserError
from engine.runtime import launch
from engine.runtime.backends import build_backend
from engine.runtime.batching import plan_batch
from engine.runtime.precision import Precision
from engine.runtime.checkpoint import Checkpointer, save_final_model
from engine.runtime.lars import LARS
from engine.runtime.syncbn import GlooSyncBatchNorm, convert_sync_batchnorm
from engine.stages.faults import parse_fault

_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "TORCHELASTIC_RUN_ID",
         "OMPI_COMM_WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_LOCALID",
         "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "PMI_SIZE", "PMIX_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    for v in _VARS:
        monkeypatch.delenv(v, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env, launcher", [
    ({}, "single"),
    ({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}, "torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "CROSS_RANK": "0"}, "deepspeed"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "env"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_PROCID": "0"}, "mpi"),  # mpirun inside an allocation
    ({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"}, "slurm"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "single"),  # the batch script itself, not an srun step
    ({"PMI_SIZE": "2"}, "mpi"),
])
def test_detect_launcher(clean_env, env, launcher):
    for k, v in env.items():
        clean_env.setenv(k, v)
    assert launch.detect_launcher() == launcher


def test_slurm_variables(clean_env):
    for k, v in {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "12345",
                 "SLURM_STEP_NODELIST": "gpu[07-08,11],cpu1"}.items():
        clean_env.setenv(k, v)
    clean_env.setenv("PATH", "/nonexistent")  # no scontrol: the list is expanded by hand
    e = launch._from_slurm()
    assert (e.rank, e.world_size, e.local_rank) == (5, 8, 1)
    assert e.master_addr == "gpu07" and e.master_port == str(20000 + 12345 % 20000)


def test_single_process_init_is_idempotent(clean_env):
    cfg = load_config(None, ["device=cpu"])
    a = launch.init_distributed(cfg.device, cfg.distributed)
    try:
        assert launch.init_distributed(cfg.device, cfg.distributed) is a
        assert (a.rank, a.world_size, a.launcher, a.pg_backend, a.is_main) == (0, 1, "single", None, True)
        launch.barrier()  # no process group: a no-op
    finally:
        launch.shutdown()
    assert launch.current() is None


def test_batch_plans():
    cfg = load_config(None, [])
    p = plan_batch(512, cfg.distributed, 4, "pretrain.batch_size")
    assert (p.per_rank, p.global_batch, p.lr_factor) == (128, 512, 1.0)
    with pytest.raises(UserError, match="must divide evenly over 3 processes"):
        plan_batch(512, cfg.distributed, 3, "pretrain.batch_size")
    cfg = load_config(None, ["distributed.batch_semantics=per_rank", "distributed.lr_scaling=linear"])
    p = plan_batch(64, cfg.distributed, 4, "linear.batch_size")
    assert (p.per_rank, p.global_batch, p.lr_factor) == (64, 256, 4.0)
    cfg = load_config(None, ["distributed.batch_semantics=per_rank", "distributed.lr_scaling=sqrt"])
    assert plan_batch(64, cfg.distributed, 4, "x").scale_lr(0.1) == pytest.approx(0.2)


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def _train(backend, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=g)
        backend.zero_grad()
        loss = backend.forward(x).float().pow(2).mean()
        backend.backward(loss)
        backend.step()


@pytest.mark.parametrize("backend, precision, ds_config", [
    ("ddp", "fp32", ""), ("ddp", "bf16", ""), ("ddp", "fp16", ""),
    # One DeepSpeed case per process: DeepSpeed caches its process groups module-wide.
    ("deepspeed", "fp16", "zero0_fp16"),
])
def test_checkpoint_roundtrip_restores_everything(tmp_path, clean_env, backend, precision, ds_config):
    over = ["device=cpu", f"precision={precision}", f"distributed.engine={backend}"]
    if ds_config:
        from tests.runtime.helpers import env

        # PATH too: the venv's ninja and another ninja rebuild each other's DeepSpeed op.
        for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "PATH"):
            clean_env.setenv(k, env()[k])
        over.append(f"distributed.deepspeed_config=configs/deepspeed/{ds_config}.json")
    cfg = load_config(None, over)
    dist = launch.init_distributed(cfg.device, cfg.distributed)
    try:
        make = lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)  # noqa: E731
        torch.manual_seed(0)
        a = build_backend(_tiny_model(), make, cfg.distributed, Precision(cfg.precision), dist, sync_bn=True,
                          per_rank_batch=8)
        _train(a, 3)
        ck = Checkpointer(tmp_path, a, dist)
        torch.manual_seed(123)
        np.random.seed(7)
        random.seed(9)
        if precision == "fp16":
            # A scale the fresh backend cannot have by chance (it starts at 2**16).
            (a.scaler if backend == "ddp" else a._autocast_scaler()).update(1024.0)
        ck.save(1, 3, {"lambda_u_epoch": 4, "ema": torch.arange(3.0)})
        scale_at_save = a.loss_scale
        expected = (torch.rand(2), np.random.rand(), random.random())
        _train(a, 2, seed=1)
        after_a = {k: v.clone() for k, v in a.module.state_dict().items()}

        torch.manual_seed(99)
        b = build_backend(_tiny_model(), make, cfg.distributed, Precision(cfg.precision), dist, sync_bn=True,
                          per_rank_batch=8)
        res = Checkpointer(tmp_path, b, dist).load_latest()
        assert (res["epoch"], res["step"]) == (1, 3)
        assert res["stage_state"]["lambda_u_epoch"] == 4 and torch.equal(res["stage_state"]["ema"], torch.arange(3.0))
        assert torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1]
        assert random.random() == expected[2]
        if precision == "fp16":
            assert b.loss_scale == scale_at_save == 1024.0
        _train(b, 2, seed=1)
        for k, v in b.module.state_dict().items():
            assert torch.equal(v, after_a[k]), k
    finally:
        launch.shutdown()


def test_checkpoints_keep_two_and_ignore_incomplete(tmp_path, clean_env):
    cfg = load_config(None, ["device=cpu"])
    dist = launch.init_distributed(cfg.device, cfg.distributed)
    try:
        backend = build_backend(_tiny_model(), lambda p: torch.optim.SGD(p, lr=0.1), cfg.distributed,
                                Precision(cfg.precision), dist, sync_bn=False)
        ck = Checkpointer(tmp_path, backend, dist)
        for step in (2, 4, 6):
            ck.save(0, step, {})
        names = sorted(p.name for p in ck.root.iterdir())
        assert names == ["e00000-s0000004", "e00000-s0000006"]
        # A save killed before its commit marker: never loaded, removed by the next save.
        torn = ck.root / "e00000-s0000008"
        torn.mkdir()
        (torn / "train_state.pt").write_bytes(b"partial")
        assert Checkpointer(tmp_path, backend, dist).load_latest()["step"] == 6
        ck.save(1, 0, {})
        assert sorted(p.name for p in ck.root.iterdir()) == ["e00000-s0000006", "e00001-s0000000"]
        # An unreadable newest checkpoint falls back to the previous one.
        (ck.root / "e00001-s0000000" / "train_state.pt").write_bytes(b"corrupt")
        assert Checkpointer(tmp_path, backend, dist).load_latest()["step"] == 6
    finally:
        launch.shutdown()


def test_save_final_model_is_weights_only_loadable(tmp_path):
    m = _tiny_model().to(torch.bfloat16)
    path = save_final_model(tmp_path / "model.pt", m)
    state = torch.load(path, weights_only=True)
    assert state.keys() == m.state_dict().keys()
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("shape", [(6, 5, 4, 4), (7, 5)])
def test_cpu_sync_batchnorm_equals_batchnorm_on_one_process(shape):
    torch.manual_seed(0)
    ref = (nn.BatchNorm2d(5) if len(shape) == 4 else nn.BatchNorm1d(5)).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = convert_sync_batchnorm(nn.Sequential(ref), torch.device("cpu"))[0]
    assert isinstance(ours, GlooSyncBatchNorm)
    ref2 = (nn.BatchNorm2d(5) if len(shape) == 4 else nn.BatchNorm1d(5)).double()
    ref2.load_state_dict(ours.state_dict())
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 10).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w = torch.randn(*shape, dtype=torch.float64)
    (ours(x) * w).sum().backward()
    (ref2(x2) * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-10)
    assert torch.allclose(ours.weight.grad, ref2.weight.grad, atol=1e-10)
    assert torch.allclose(ours.running_var, ref2.running_var, atol=1e-12)
    assert torch.allclose(ours.running_mean, ref2.running_mean, atol=1e-12)
    ours.eval()
    ref2.eval()
    assert torch.allclose(ours(x), ref2(x2), atol=1e-10)


def test_lars_trust_ratio_per_layer():
    w = nn.Parameter(torch.full((4, 4), 2.0))
    b = nn.Parameter(torch.ones(4))
    opt = LARS([w, b], lr=1.0, momentum=0.0, weight_decay=0.0, eta=0.001)
    w.grad = torch.full((4, 4), 10.0)
    b.grad = torch.full((4,), 10.0)
    opt.step()
    # Weight: step = lr * eta * ||w|| / ||g|| * g = 0.001 * 8/40 * 10; biases are not adapted.
    assert torch.allclose(w, torch.full((4, 4), 2.0 - 0.002))
    assert torch.allclose(b, torch.full((4,), 1.0 - 10.0))


def test_fault_spec():
    assert parse_fault("") is None
    assert parse_fault("5") == (5, 0, "exit")
    assert parse_fault("7:1:kill") == (7, 1, "kill")
    with pytest.raises(UserError):
        parse_fault("x")
    with pytest.raises(UserError):
        parse_fault("3:0:explode")

"""Every launcher runs the real ``dbd run`` pipeline (SimCLR stage) in real processes.

One process, ``torchrun`` with 2 processes, ``torchrun`` as two 1-process "nodes",
``mpirun -np 2`` and the ``deepspeed`` launcher must all follow the same loss
trajectory for the same global batch; the 2-process DDP launchers do the very same
arithmetic, so they agree with each other to float rounding of one summation order.
Then: resume after SIGKILL (DDP), a DeepSpeed ZeRO-2 resume through its own
checkpoints that replays the steps after the checkpoint exactly, ``torchrun
--max-restarts`` over a rank that dies once, and a hung rank that must end the job
through the process-group timeout.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.runtime.helpers import (BIN, STEPS, assert_trajectory, check, dbd_cmd, env, final_state,
                                   free_port, losses, max_weight_diff, run, run_dir, step_records,
                                   torchrun_cmd, write_config)

pytestmark = pytest.mark.slow

# Between 1 and 2 processes (different summation orders, see assert_trajectory). With the
# reference's kaiming initialisation the width-4 net is chaotic: measured on the AMD EPYC
# at 7fbb10b, steps 0-2 agreed within 6e-5 and the rounding differences then grew to
# 4e-3, 8e-3 and 6e-2 by steps 3-5. Since the SimCLR blur became the reference's full
# Gaussian (issue 12) the growth starts a step earlier: step 2 differs by 2.5e-3 (and by
# 3e-3 in benchmarks/gpu/'s smoke run, which compares the same thing independently).
# The first two steps are where a real error (a gradient off by the world size, a wrong
# shard, unsynchronised BatchNorm) shows, at the 1e-1 level or more.
CROSS = dict(first_tol=1e-4, tol=1.5e-1, first=2)
# Between 2-process launchers running the same DDP code.
SAME = dict(first_tol=1e-6, tol=1e-5)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("launchers")


@pytest.fixture(scope="module")
def single(work, digits_root):
    cfg = write_config(work, digits_root, "single")
    check(run(dbd_cmd(cfg)))
    return run_dir(cfg)


@pytest.fixture(scope="module")
def torchrun2(work, digits_root):
    cfg = write_config(work, digits_root, "torchrun2")
    proc = check(run(torchrun_cmd("--nproc_per_node", "2", "--master_port", free_port(), "-m", "engine", "run", cfg)))
    assert "launcher=torchrun world_size=2 backend=gloo" in proc.stdout
    return run_dir(cfg)


def test_single_process(single):
    import torch

    assert sorted(losses(single)) == list(range(STEPS))
    state = final_state(single)
    assert {k.split(".")[0] for k in state} == {"backbone", "head"}
    # The newest complete checkpoint and the one before it are kept.
    ckpts = sorted(p.name for p in (single / "pretrain" / "checkpoints").iterdir())
    assert ckpts == ["e00001-s0000002", "e00002-s0000000"]
    meta = (single / "pretrain" / "done.json").read_text()
    assert '"final_loss"' in meta and '"images_per_second"' in meta
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_torchrun_two_processes_match_one(single, torchrun2):
    assert_trajectory(losses(torchrun2), losses(single), **CROSS)


def test_torchrun_two_nodes(work, digits_root, torchrun2):
    cfg = write_config(work, digits_root, "nodes")
    port = free_port()
    procs = [subprocess.Popen([str(c) for c in torchrun_cmd(
        "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node), "--master_addr", "127.0.0.1",
        "--master_port", str(port), "-m", "engine", "run", cfg)], cwd=BIN.parents[1], env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=420)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    assert_trajectory(losses(run_dir(cfg)), losses(torchrun2), **SAME)


def test_mpirun(work, digits_root, torchrun2):
    cfg = write_config(work, digits_root, "mpirun")
    proc = check(run([BIN / "mpirun", "-np", "2", "--oversubscribe", "--allow-run-as-root",
                      sys.executable, "-m", "engine", "run", cfg]))
    assert "launcher=mpi world_size=2" in proc.stdout
    assert_trajectory(losses(run_dir(cfg)), losses(torchrun2), **SAME)


def test_deepspeed_launcher(work, digits_root, single, torchrun2):
    cfg = write_config(work, digits_root, "deepspeed",
                       **{"distributed.engine": "deepspeed",
                          "distributed.deepspeed_config": "configs/deepspeed/zero0_fp32.json"})
    proc = check(run([BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "--module", "engine",
                      "run", cfg], timeout=600))
    assert "launcher=deepspeed world_size=2" in proc.stdout
    got = losses(run_dir(cfg))
    assert_trajectory(got, losses(torchrun2), first_tol=1e-5, tol=1e-3)
    assert_trajectory(got, losses(single), **CROSS)
    ckpt = run_dir(cfg) / "pretrain" / "checkpoints" / "e00002-s0000000" / "deepspeed"
    assert ckpt.is_dir()  # DeepSpeed's own save_checkpoint, called on every rank


def test_deepspeed_launcher_hostfile_openmpi(work, digits_root, torchrun2):
    # The multi-node path: the deepspeed runner reads the hostfile and starts the ranks
    # through mpirun, so the engine discovers them through MPI. On one host without an
    # ssh server, --no_ssh_check and --force_multi make it take that path anyway.
    cfg = write_config(work, digits_root, "ds-openmpi", **{
        "distributed.engine": "deepspeed", "distributed.deepspeed_config": "configs/deepspeed/zero0_fp32.json"})
    hosts = work / "hostfile"
    hosts.write_text("localhost slots=2\n")
    proc = check(run([BIN / "deepspeed", "--hostfile", hosts, "--no_ssh_check", "--force_multi",
                      "--master_addr", "127.0.0.1", "--launcher", "openmpi",
                      "--launcher_args", "--allow-run-as-root --oversubscribe", "--module", "engine", "run", cfg],
                     timeout=600))
    assert "launcher=mpi world_size=2" in proc.stdout
    assert_trajectory(losses(run_dir(cfg)), losses(torchrun2), first_tol=1e-5, tol=1e-3)


def test_sigkill_mid_epoch_then_rerun_resumes(work, digits_root, single):
    cfg = write_config(work, digits_root, "killed")
    # Global step 7 is the last step of epoch 1: the newest checkpoint is the mid-epoch
    # one after step 5 (epoch 1, step 2).
    first = run(dbd_cmd(cfg), DBD_FAULT_EXIT_AT_STEP="7:0:kill")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    ckpts = run_dir(cfg) / "pretrain" / "checkpoints"
    assert (ckpts / "e00001-s0000002" / "meta.json").is_file()
    assert not (run_dir(cfg) / "pretrain" / "model.pt").exists()
    # The very same command again (the fault fires once per run dir).
    second = check(run(dbd_cmd(cfg), DBD_FAULT_EXIT_AT_STEP="7:0:kill"))
    assert "resuming from" in second.stdout and "e00001-s0000002" in second.stdout
    assert_trajectory(losses(run_dir(cfg)), losses(single), first_tol=1e-6, tol=1e-6)
    assert max_weight_diff(final_state(run_dir(cfg)), final_state(single)) < 1e-6


def test_deepspeed_zero2_two_processes_resume_replays_the_same_steps(work, digits_root):
    # Checkpoints at epoch ends only: the rank dies at step 7, the rerun restarts from
    # step 4 and must reproduce steps 4-6 exactly (ZeRO-2 partitions, bf16 autocast).
    cfg = write_config(work, digits_root, "zero2", precision="bf16", **{
        "distributed.engine": "deepspeed", "distributed.deepspeed_config": "configs/deepspeed/zero2_bf16.json",
        "distributed.checkpoint_every": 0})
    cmd = torchrun_cmd("--nproc_per_node", "2", "--master_port", free_port(), "-m", "engine", "run", cfg)
    first = run(cmd, DBD_FAULT_EXIT_AT_STEP="7:1:exit", timeout=600)
    assert first.returncode != 0
    cmd = torchrun_cmd("--nproc_per_node", "2", "--master_port", free_port(), "-m", "engine", "run", cfg)
    second = check(run(cmd, DBD_FAULT_EXIT_AT_STEP="7:1:exit", timeout=600))
    assert "resuming from" in second.stdout and "e00001-s0000000" in second.stdout
    records = step_records(run_dir(cfg))
    seen: dict[int, list[float]] = {}
    for step, loss in records:
        seen.setdefault(step, []).append(loss)
    assert sorted(seen) == list(range(STEPS))
    replayed = {s: v for s, v in seen.items() if len(v) > 1}
    assert sorted(replayed) == [4, 5, 6]
    for s, (a, b) in ((s, v[:2]) for s, v in replayed.items()):
        assert abs(a - b) <= 1e-6, f"step {s}: {a} before the failure, {b} after the resume"


def test_torchrun_max_restarts_survives_a_rank_that_dies_once(work, digits_root, torchrun2):
    cfg = write_config(work, digits_root, "restart")
    proc = check(run(torchrun_cmd("--nproc_per_node", "2", "--max-restarts", "1", "--master_port", free_port(),
                                  "-m", "engine", "run", cfg), DBD_FAULT_EXIT_AT_STEP="5:1:exit"))
    assert (run_dir(cfg) / "pretrain" / ".fault-5-1").is_file()
    assert "resuming from" in proc.stdout
    assert_trajectory(losses(run_dir(cfg)), losses(torchrun2), **SAME)
    assert max_weight_diff(final_state(run_dir(cfg)), final_state(torchrun2)) < 1e-5


def test_hung_rank_ends_the_job_within_the_timeout(work, digits_root):
    cfg = write_config(work, digits_root, "hung", **{"distributed.timeout_s": 10})
    t0 = time.monotonic()
    proc = run(torchrun_cmd("--nproc_per_node", "2", "--master_port", free_port(), "-m", "engine", "run", cfg),
               DBD_FAULT_EXIT_AT_STEP="2:1:hang", timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert elapsed < 240, f"the job took {elapsed:.0f} s to end"
    assert not (run_dir(cfg) / "pretrain" / "done.json").exists()

"""Phase 4, ``distributed``: every registered stage for a few steps at world size 1 (NCCL)
and on 2 gloo processes sharing the one GPU; the 2-process losses against the 1-process
ones at the same global batch."""
from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.gpu.data import memory_data
from benchmarks.gpu.plan import GRACE_S, SIZES, cuda_only, device, dist_stages, mode
from benchmarks.gpu.progress import Progress, saved_on_error
from benchmarks.harness import run_child

# SimCLR on 1 and 2 processes, as tests/runtime/test_launchers.py compares them: the first
# CROSS_FIRST steps within CROSS_TOL, where a wrong shard, gradient scale or unsynchronised
# BatchNorm shows at the 1e-1 level (step 0 checks the forward, step 1 the first update);
# later steps only within CROSS_LATER_TOL, since fp32 rounding differences of the two
# summation orders grow fast in these small nets (width 4 on random data, CPU: 0 and
# 8e-7 at steps 0 and 1, 3e-3 at step 2).
CROSS_TOL, CROSS_FIRST, CROSS_LATER_TOL = 1e-4, 2, 1.5e-1
# Stages whose step is the same computation on 1 and on N processes (views drawn for the
# global batch, engine/defenses/dbd/pretrain.py); the others draw their views per rank.
RANK_INVARIANT = ("pretrain",)


def stage_losses(cfg, name: str, dist, data, steps: int) -> dict:
    """The loss the Trainer logs (the mean over ranks) of the stage's first steps, and the
    labelled split of a stage that makes one."""
    from benchmarks import stages
    stage = stages.build(cfg, name, Path(cfg.run_dir), dist, data)
    stage.on_epoch_start(0)
    batches = iter(stage.batches(0))
    try:
        losses = [dist.mean_over_ranks({"loss": stage.train_step(next(batches), 0, k)["loss"]})["loss"]
                  for k in range(steps)]
    finally:
        getattr(batches, "close", lambda: None)()
    split = getattr(getattr(stage, "split", None), "labelled", None)
    return {"losses": losses} if split is None else {"losses": losses, "labelled": [int(i) for i in split]}


def nccl_probe(dev) -> dict:
    """A 1-rank NCCL group's all_reduce and barrier: DDP at world size 1 opens no process
    group (engine/runtime/launch.py), so the stages alone never reach NCCL."""
    import torch
    import torch.distributed as td
    td.init_process_group("nccl", store=td.HashStore(), rank=0, world_size=1, device_id=dev)
    try:
        t = torch.arange(4, dtype=torch.float32, device=dev)
        td.all_reduce(t)
        td.barrier(device_ids=[dev.index])
        return {"all_reduce": t.tolist(), "pass": t.tolist() == [0.0, 1.0, 2.0, 3.0]}
    finally:
        td.destroy_process_group()


def rank(smoke: bool, group: str, probe_nccl: bool, progress: str | None = None) -> dict:
    """One rank (started by harness.run_child): every stage for a few steps on in-memory data,
    with every stage's own tiny settings (a new defense's stages fit with no edit here)."""
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown
    from engine.stages import STAGES
    s, dev = SIZES[mode(smoke)]["distributed"], device(smoke)
    # fp32 without TF32 and cuDNN's autotuning: the comparison is of arithmetic, not of cuDNN's choices.
    over = [o for name in dist_stages() for o in STAGES[name].tiny_overrides()] + s["overrides"] + [
        f"device={dev.type}", f"distributed.process_group={group}", "distributed.tf32=false",
        "distributed.cudnn_benchmark=false", "distributed.timeout_s=120", "logging.progress=false", "attack.name=none"]
    dist = init_distributed(dev.type, load_config(None, over).distributed)
    cfg = load_config(None, over + [f"run_dir={tempfile.mkdtemp(prefix=f'dbd-gpu-dist-r{dist.rank}-')}"])
    data = memory_data(cfg, dist, s["n_train"], cfg.data.image_size)
    p = Progress(progress if dist.is_main else None, float("inf"))
    devices = [str(dist.device)] * dist.world_size
    if dist.world_size > 1:  # every rank's own device, to show where the ranks ran
        import torch.distributed as td
        td.all_gather_object(devices, str(dist.device))
    p.data.update(world_size=dist.world_size, backend=dist.pg_backend, launcher=dist.launcher, devices=devices)
    try:  # a stage's error is recorded: the ranks fail alike, so the next stage still lines up
        for name in dist_stages():
            p.case(name, lambda name=name: stage_losses(cfg, name, dist, data, s["steps"]))
    finally:
        shutdown()
    if probe_nccl:
        p.case("nccl_probe", lambda: nccl_probe(dist.device))
    return p.finish()


def compare(name: str, a: dict, b: dict) -> dict:
    """A stage's 2-process losses against its 1-process ones, and its labelled split."""
    if "losses" not in a or "losses" not in b:
        return {"compared": False, "reason": a.get("error") or b.get("error") or "no run"}
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    c = {"losses_1": a["losses"], "losses_2": b["losses"], "abs_diff": diffs, "max_abs_diff": max(diffs),
         "compared": name in RANK_INVARIANT}
    if name in RANK_INVARIANT:
        bounds = [CROSS_TOL] * CROSS_FIRST + [CROSS_LATER_TOL] * (len(diffs) - CROSS_FIRST)
        c.update(max_abs_diff_tight=max(diffs[:CROSS_FIRST]), within=all(d <= t for d, t in zip(diffs, bounds)))
    else:
        c["reason"] = "views drawn per rank: 1 and 2 processes differ by design"
    if "labelled" in a and "labelled" in b:
        c.update(split_identical=a["labelled"] == b["labelled"], split_labelled=len(a["labelled"]))
    return c


def run(smoke: bool, deadline: float, progress: str | None = None, hard: float = 0.0) -> dict:
    """Both runs side by side, from the parent (why: runner.run_phase)."""
    p, cuda = Progress(progress, deadline, cuda_only("distributed", smoke)), device(smoke).type == "cuda"
    hard, work = hard or deadline + GRACE_S, Path(tempfile.mkdtemp(prefix="dbd-gpu-dist-"))
    # Both runs on the first visible GPU, also where the machine has several (each rank then
    # sees one GPU, and engine.runtime.device puts every rank on it).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    one_gpu = {"CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"} if cuda else {}

    def launch(world: int, group: str) -> dict:
        saved = work / f"ws{world}.json"
        kwargs = dict(smoke=smoke, group=group, probe_nccl=world == 1 and cuda, progress=str(saved))
        return saved_on_error(lambda: run_child(  # smoke: 3 processes share the CPU, a thread each
            "benchmarks.gpu.distributed_phase:rank", kwargs, world=world if world > 1 else 0,
            timeout=max(10.0, hard - time.time()), threads=1 if smoke else 0, env=one_gpu), saved)
    with ThreadPoolExecutor(2) as pool:
        one, two = pool.map(launch, (1, 2), ("nccl" if cuda else "auto", "gloo"))
    p.data["results"] = {"ws1": one, "ws2_gloo": two}
    # A stage that raised inside a run that completed counts as the phase's error.
    p.data["failed_runs"] = [f"{ws}/{key}" for ws, r in p.data["results"].items()
                             for key, got in r.get("results", {}).items() if "error" in got]
    p.data["comparison"] = {name: compare(name, one.get("results", {}).get(name, {}),
                                          two.get("results", {}).get(name, {})) for name in dist_stages()}
    p.data["settings"] = {**SIZES[mode(smoke)]["distributed"], "stages": dist_stages(), "cross_tolerance": CROSS_TOL,
                          "cross_tight_steps": CROSS_FIRST, "cross_later_tolerance": CROSS_LATER_TOL}
    return p.finish()

"""Phase 4, ``distributed``: every stage for a few steps through NCCL at world size 1 and
through gloo with 2 processes on the one GPU, the 2-process losses against the 1-process
ones at the same global batch."""
from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.gpu.common import GRACE_S, NO_CUDA, SIZES, Progress, device, dist_stages, error, memory_data, mode
from benchmarks.harness import run_child

# 1 vs 2 processes, SimCLR, as tests/runtime/test_launchers.py compares them (CROSS): the
# first steps within CROSS_TOL, where a wrong shard, gradient scale or unsynchronised
# BatchNorm shows at the 1e-1 level (step 0 checks the forward, step 1 the first update);
# later steps only within CROSS_LATER_TOL, since fp32 rounding differences of the two
# summation orders grow fast in these small nets (width 4 on random data, CPU: 0 and
# 8e-7 at steps 0 and 1, 3e-3 at step 2).
CROSS_TOL, CROSS_FIRST, CROSS_LATER_TOL = 1e-4, 2, 1.5e-1
# Stages whose step is the same computation on 1 and on N processes (views drawn for the
# global batch, engine/defenses/dbd/pretrain.py); the others draw their views per rank.
RANK_INVARIANT = ("pretrain",)


def _dist_stage(cfg, name: str, run_dir: Path, dist, data, steps: int) -> dict:
    from benchmarks import stages
    stage = stages.build(cfg, name, run_dir, dist, data)
    stage.on_epoch_start(0)
    losses = []
    batches = iter(stage.batches(0))
    try:
        for k in range(steps):
            out = stage.train_step(next(batches), 0, k)
            losses.append(dist.mean_over_ranks({"loss": out["loss"]})["loss"])  # the Trainer's logged loss
    finally:
        getattr(batches, "close", lambda: None)()
    res = {"losses": losses}
    split = getattr(stage, "split", None)
    if split is not None and split.labelled is not None:
        res["labelled"] = [int(i) for i in split.labelled]
    return res


def _nccl_probe(dev) -> dict:
    """A 1-rank NCCL group's all_reduce and barrier: DDP at world size 1 creates no process
    group (engine/runtime/launch.py), so the stage runs alone never reach NCCL."""
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
    """One rank (started by harness.run_child): every stage for a few steps on in-memory data."""
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown
    s = SIZES[mode(smoke)]["distributed"]
    dev = device(smoke)
    # Every stage's own tiny settings first (a new defense's stages fit the small set with
    # no edit here), then this phase's batch sizes for the stages it compares. fp32 without
    # TF32 and cuDNN's autotuning: the comparison is of arithmetic, not of cuDNN's choices.
    from engine.stages import STAGES
    over = [o for name in dist_stages() for o in STAGES[name].tiny_overrides()]
    over += [f"device={dev.type}", f"distributed.process_group={group}", "distributed.tf32=false",
            "distributed.cudnn_benchmark=false", "distributed.timeout_s=120", "logging.progress=false",
            "attack.name=none", f"model.width={s['width']}", f"pretrain.batch_size={s['batch']}",
            f"supervised.batch_size={s['batch']}", f"linear.batch_size={s['batch']}",
            f"finetune.batch_size={s['finetune_batch']}", f"finetune_labelled.batch_size={s['finetune_batch']}",
            "finetune.iterations_per_epoch=8"]
    dist = init_distributed(dev.type, load_config(None, over).distributed)
    work = Path(tempfile.mkdtemp(prefix=f"dbd-gpu-dist-r{dist.rank}-"))  # per rank: no shared files
    cfg = load_config(None, over + [f"run_dir={work}"])
    data = memory_data(cfg, dist, s["n_train"], cfg.data.image_size)
    devices = [str(dist.device)]
    if dist.world_size > 1:  # every rank's device, to show where the ranks ran
        import torch.distributed as td
        devices = [None] * dist.world_size
        td.all_gather_object(devices, str(dist.device))
    p = Progress(progress if dist.is_main else None, float("inf"))
    out = p.data = {"world_size": dist.world_size, "backend": dist.pg_backend, "process_group_option": group,
                    "device": str(dist.device), "devices": devices, "launcher": dist.launcher, "runs": {}}
    try:
        for name in dist_stages():
            try:
                out["runs"][name] = _dist_stage(cfg, name, work, dist, data, s["steps"])
            except Exception as e:  # recorded; the ranks fail alike, so the next stage still lines up
                out["runs"][name] = error(e)
            p.save()
    finally:
        shutdown()
    if probe_nccl:
        try:
            out["nccl_probe"] = _nccl_probe(dist.device)
        except Exception as e:
            out["nccl_probe"] = {"error": f"{type(e).__name__}: {e}", "pass": False}
    return p.finish()


def _compare(one: dict, two: dict) -> dict:
    out = {}
    for name in dist_stages():
        a, b = one.get("runs", {}).get(name, {}), two.get("runs", {}).get(name, {})
        if "losses" not in a or "losses" not in b:
            out[name] = {"compared": False, "reason": a.get("error") or b.get("error") or "no run"}
            continue
        diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
        c = {"losses_1": a["losses"], "losses_2": b["losses"], "abs_diff": diffs, "max_abs_diff": max(diffs)}
        if name in RANK_INVARIANT:
            bounds = [CROSS_TOL if k < CROSS_FIRST else CROSS_LATER_TOL for k in range(len(diffs))]
            c.update(compared=True, tolerance=CROSS_TOL, tolerance_later=CROSS_LATER_TOL, tight_steps=CROSS_FIRST,
                     max_abs_diff_tight=max(diffs[:CROSS_FIRST]), within=all(d <= b for d, b in zip(diffs, bounds)))
        else:
            c.update(compared=False, reason="views drawn per rank: 1 and 2 processes differ by design")
        if "labelled" in a and "labelled" in b:
            c["split_identical"] = a["labelled"] == b["labelled"]
            c["split_labelled"] = len(a["labelled"])
        out[name] = c
    return out


def run(smoke: bool, deadline: float, progress: str | None = None, hard: float = 0.0) -> dict:
    """The stages through NCCL at world size 1 and gloo with 2 processes on the one device.
    Runs in the parent: its ranks are child processes already (harness.run_child), and a
    child of a phase child would outlive that child's kill. The two runs go side by side."""
    import torch
    p = Progress(progress, deadline)
    cuda = not smoke
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(NO_CUDA)
    group1 = "nccl" if cuda else "auto"
    if not cuda:
        p.cuda_only("nccl", "needs CUDA: the 1-process run here is on the CPU (process_group auto = gloo; DDP at "
                            "world size 1 opens no group)")
        p.cuda_only("gloo_on_one_gpu", "needs CUDA: the 2 gloo processes share the CPU here, not one GPU")
    hard = hard or deadline + GRACE_S
    work = Path(tempfile.mkdtemp(prefix="dbd-gpu-dist-"))
    # Both runs on one GPU, the first visible one, also where the machine has several
    # (each rank then sees one GPU, and engine.runtime.device puts every rank on it).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    one_gpu = {"CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"} if cuda else {}

    def launch(world: int, group: str) -> dict:
        prog = work / f"ws{world}.json"
        try:
            return run_child("benchmarks.gpu.distributed_phase:rank",
                             dict(smoke=smoke, group=group, probe_nccl=world == 1 and cuda, progress=str(prog)),
                             world=world if world > 1 else 0, timeout=max(10.0, hard - time.time()),
                             threads=1 if smoke else 0, env=one_gpu)  # smoke: 3 processes share the CPU
        except Exception as e:
            partial = json.loads(prog.read_text()) if prog.is_file() else {}
            return {**partial, "error": f"{type(e).__name__}: {e}"}
    t0 = time.time()
    with ThreadPoolExecutor(2) as pool:
        one, two = pool.submit(launch, 1, group1), pool.submit(launch, 2, "gloo")
        one, two = one.result(), two.result()
    p.data["results"] = {"ws1": one, "ws2_gloo": two}
    # A stage that raised inside a run (the run itself completed) counts as the phase's error.
    p.data["failed_runs"] = [f"{ws}/{stage}" for ws, r in p.data["results"].items()
                             for stage, got in (r.get("runs") or {}).items() if "error" in got]
    p.data["comparison"] = _compare(one, two)
    p.data["settings"] = {**SIZES[mode(smoke)]["distributed"], "stages": dist_stages(),
                          "ws1_process_group": group1, "ws2_process_group": "gloo", "cross_tolerance": CROSS_TOL,
                          "cross_tight_steps": CROSS_FIRST, "cross_later_tolerance": CROSS_LATER_TOL,
                          "numerics": "fp32, TF32 and cuDNN autotuning off"}
    p.data["seconds"] = time.time() - t0
    return p.finish()

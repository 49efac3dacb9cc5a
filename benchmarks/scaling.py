"""Weak scaling of the SimCLR step on CPU: world size 1, 2, ... with a fixed per-rank batch.

Each world size is a real multi-process job (``harness.run_child``: W processes that
rendezvous through the env:// variables the engine reads, DDP over gloo). Every rank
builds the real pretrain stage and runs its ``train_step`` on a fixed uint8 batch:
views on the device, the forward of both views, NT-Xent over the embeddings of all
ranks, DDP's gradient all-reduce, SyncBatchNorm as the reference configures it, SGD.

Every rank gets the same number of threads whatever W (cores // largest W), so the
per-rank work and resources stay fixed and only the distribution costs change:
efficiency(W) = throughput(W) / (W x throughput(1)), 1.0 being perfect. Launches of
the different world sizes alternate; each launch times several windows of steps after
warm-up, between barriers, on rank 0.
"""
from __future__ import annotations

import os
import tempfile
import time

from benchmarks.harness import measurement, run_child

FULL = dict(width=16, per_rank_batch=64, warmup=2, steps=3, windows=3, launches=2, max_world=4)
QUICK = dict(width=4, per_rank_batch=8, warmup=1, steps=2, windows=1, launches=1, max_world=2)


def rank(root: str, s: dict, threads: int) -> dict:
    """One rank of a scaling job."""
    import torch

    from benchmarks import stages
    from benchmarks.harness import pin_torch_threads
    from engine.runtime.launch import barrier, shutdown

    pin_torch_threads(threads)
    world = int(os.environ["WORLD_SIZE"])
    cfg = stages.config(root, width=s["width"], workers=threads, extra=[
        f"pretrain.batch_size={s['per_rank_batch'] * world}", "pretrain.sync_bn=true"])
    dist, data = stages.open_run(cfg)
    run_dir = tempfile.TemporaryDirectory(prefix="dbd-bench-scaling-")
    try:
        stage = stages.build(cfg, "pretrain", run_dir.name, dist, data)
        images = torch.randint(0, 256, (s["per_rank_batch"], 32, 32, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(dist.rank))
        step = 0
        for step in range(s["warmup"]):
            stage.train_step((images,), 0, step)
        rates = []
        for _ in range(s["windows"]):
            barrier()
            t0 = time.perf_counter()
            for _ in range(s["steps"]):
                step += 1
                stage.train_step((images,), 0, step)
            barrier()
            rates.append(s["steps"] * stage.images_per_step / (time.perf_counter() - t0))
        return {"world": world, "rates": rates, "threads": torch.get_num_threads()}
    finally:
        shutdown()
        run_dir.cleanup()


def run(quick: bool = False) -> dict:
    from benchmarks.synthetic import cifar_like

    s = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    worlds = [w for w in (1, 2, 4, 8) if w <= min(cores, s["max_world"])] or [1]
    if len(worlds) == 1 and quick:
        worlds = [1, 2]  # a 1-core machine still checks the 2-process path (oversubscribed)
    threads = max(1, cores // max(worlds))
    root = str(cifar_like(256 if quick else 1024).root)  # the stage's loader needs a set; the step reads none
    rates: dict[int, list[float]] = {w: [] for w in worlds}
    for k in range(s["launches"]):
        for w in (worlds if k % 2 == 0 else worlds[::-1]):
            rates[w] += run_child("benchmarks.scaling:rank", dict(root=root, s=s, threads=threads), world=w,
                                  threads=threads, timeout=240 if quick else 600)["rates"]
    base = measurement("images/s", rates[worlds[0]])["median"]
    measurements, efficiency = {}, {}
    for w in worlds:
        m = measurements[f"world{w}/images_per_s"] = measurement("images/s", rates[w], world_size=w)
        efficiency[str(w)] = m["median"] / (w * base)
        measurements[f"world{w}/weak_scaling_efficiency"] = {
            "unit": "efficiency", "median": efficiency[str(w)], "reps": [r / (w * base) for r in rates[w]]}
    notes = [f"{threads} thread(s) per rank at every world size ({cores} cores)"]
    if max(worlds) * threads > cores:
        notes.append("more ranks than cores: oversubscribed, the efficiency reflects that")
    return {
        "unit": "images/s",
        "settings": {**s, "quick": quick, "worlds": worlds, "threads_per_rank": threads, "backend": "ddp (gloo)",
                     "precision": "fp32", "sync_bn": True,
                     "step": "the pretrain stage's train_step (SimCLR): views + forward + NT-Xent + backward + SGD"},
        "measurements": measurements, "weak_scaling_efficiency": efficiency,
        "not_measured": [f"world sizes above {max(worlds)}: this machine has {cores} cores",
                         "multi-GPU (NCCL) scaling: this benchmark runs CPU processes only"],
        "notes": notes,
    }

"""Phase 3, ``steps``: SimCLR and MixMatch steps of the real stages over ``MemoryData``, at
CIFAR and ImageNet size, bf16 and fp32, timed by ``timing.time_steps``: images/s,
share of the measured bf16 matmul peak, host syncs, peak memory, and the split into data
copy, views and model."""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks import stages
from benchmarks.gpu.data import memory_data
from benchmarks.gpu.plan import SIZES, cuda_only, device, mode
from benchmarks.gpu.progress import Progress, free_memory
from benchmarks.gpu.timing import matmul_ceiling, time_steps
from engine.config import load_config

SPLIT = {"copy": "wait_s", "views": "views_s", "model": "model_s"}  # part -> time_steps' key


def to_each(batch, fn):
    return fn(batch) if torch.is_tensor(batch) else type(batch)(to_each(b, fn) for b in batch)


def case_config(case: tuple, precision: str, dev, run_dir: Path):
    family, name, arch, width, size, source, batch = case
    over = [f"device={dev.type}", "logging.progress=false", "attack.name=none", f"model.arch={arch}",
            f"model.width={width}", f"data.image_size={size}", f"precision={precision}", f"run_dir={run_dir}",
            f"{name}.batch_size={batch}"]
    if family == "imagenet":
        over += [f"data.decode_size={source}", "finetune.view.kind=resized_crop", "data.mean=[0.485,0.456,0.406]",
                 "data.std=[0.229,0.224,0.225]"]
    return load_config(None, over)


def copies_of_first_batch(stage, dev):
    """The stage's first batch, copied to the device again at every step: the engine's CUDA
    loaders deliver pinned host batches copied without blocking (timed as the batch's wait)."""
    stage.on_epoch_start(0)  # MixMatch: the split (one eval pass over the set) and its loaders
    batches = iter(stage.batches(0))
    first = next(batches)
    getattr(batches, "close", lambda: None)()
    host = to_each(first, lambda t: t.pin_memory()) if dev.type == "cuda" else first
    return iter(lambda: to_each(host, lambda t: t.to(dev, non_blocking=True)), None)


def time_case(case: tuple, precision: str, s: dict, dist, peak: float) -> dict:
    family, name, arch, width, size, source, batch = case
    run_dir = Path(tempfile.mkdtemp(prefix="dbd-gpu-steps-"))
    cfg, dev = case_config(case, precision, dist.device, run_dir), dist.device
    # MixMatch splits the set in halves (epsilon 0.5), each at least one global batch.
    stage = stages.build(cfg, name, run_dir, dist, memory_data(cfg, dist, batch * (1 if name == "pretrain" else 2),
                                                                  source))
    r = time_steps(stage, s["warmup"], s["timed"][family], dev, batches=copies_of_first_batch(stage, dev), count=True)
    total = sum(map(sum, (r[k] for k in SPLIT.values())))
    ips, per_step = statistics.median(r["images_per_s"]), stage.images_per_step
    result = {
        "family": family, "stage": name, "kind": "simclr" if name == "pretrain" else "mixmatch", "arch": arch,
        "width": width, "image_size": size, "source_size": source, "batch": batch, "precision": precision,
        "images_per_step": per_step, "images_per_s": ips, "images_per_s_by_step": r["images_per_s"],
        "split_ms": {part: statistics.median(r[k]) * 1e3 for part, k in SPLIT.items()},
        "split_share": {part: sum(r[k]) / total for part, k in SPLIT.items()},
        "flops_per_step": r["flops_per_step"], "bf16_peak_share": ips * r["flops_per_step"] / per_step / peak,
        "host_syncs_per_step": r["host_syncs_per_step"], "host_syncs": r["host_syncs"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None,
        "loss": r["loss"], "loss_finite": math.isfinite(r["loss"])}
    del stage
    free_memory()
    return result


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    from engine.runtime.launch import init_distributed, shutdown
    p, dev, s = Progress(progress, deadline, cuda_only("steps", smoke)), device(smoke), SIZES[mode(smoke)]["steps"]
    base = load_config(None, [f"device={dev.type}", "logging.progress=false", "attack.name=none"])
    dist = init_distributed(base.device, base.distributed)  # cuDNN autotuning and TF32 as a run sets them
    # The ceiling the shares refer to: the best of three measurements of a large bf16 matmul.
    peak = max(matmul_ceiling(dist.device, "bf16", quick=smoke) for _ in range(3))
    p.data.update(device=str(dist.device), bf16_matmul_peak_flops=peak,
                  settings={**s, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "data": "MemoryData, random uint8"})
    try:
        for precision in ("bf16", "fp32"):
            for case in s["cases"]:
                family, name, _, _, size, _, batch = case
                key = f"{family}{size}/{'simclr' if name == 'pretrain' else 'mixmatch'}/b{batch}/{precision}"
                p.case(key, lambda case=case, precision=precision: time_case(case, precision, s, dist, peak),
                       kind=f"{family}/{name}/{batch}")
    finally:
        shutdown()
    return p.finish()

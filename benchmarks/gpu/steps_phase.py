"""Phase 3, ``steps``: SimCLR and MixMatch steps of the real stages over ``MemoryData``, at
CIFAR and ImageNet size, bf16 and fp32, timed by ``benchmarks.step.time_steps`` (CUDA
events): images/s, share of the measured bf16 matmul peak, host syncs, peak memory, and
the split into data copy, views and model. See docs/benchmarks.md."""
from __future__ import annotations

import math
import statistics
import tempfile
from pathlib import Path

from benchmarks.gpu.common import SIZES, Progress, device, free_memory, memory_data, mode

SPLIT = {"copy": "wait_s", "views": "views_s", "model": "model_s"}  # the split's parts: time_steps'


def _map(batch, fn):
    import torch
    return fn(batch) if torch.is_tensor(batch) else type(batch)(_map(b, fn) for b in batch)


def _flops_estimate(stage: str, arch: str, size: int, width: int, per_rank: int, k_views: int) -> float:
    """FLOPs of one step by benchmarks/flops.py (convolutions and matmuls of the model)."""
    from benchmarks.flops import count
    if stage == "pretrain":  # two views per image through backbone + projection head
        return 2 * per_rank * count(arch, size, head="simclr", width=width)["forward_backward"]
    c = count(arch, size, width=width)
    # Label guessing (K forwards of the unlabelled batch, no grad), then forward and
    # backward over the labelled batch and its K unlabelled views (the linear head, under
    # 0.1 % of the backbone, is left out).
    return k_views * per_rank * c["forward"] + (1 + k_views) * per_rank * c["forward_backward"]


def _time_step(case, precision: str, s: dict, dist, peak: float, work: Path) -> dict:
    import torch
    from benchmarks import stages
    from benchmarks.step import time_steps
    from engine.config import load_config
    family, name, arch, width, size, source, batch = case
    dev, cuda = dist.device, dist.device.type == "cuda"
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    over = [f"device={dev.type}", "logging.progress=false", "attack.name=none", f"model.arch={arch}",
            f"model.width={width}", f"data.image_size={size}", f"precision={precision}", f"run_dir={run_dir}",
            f"{name}.batch_size={batch}"]
    if family == "imagenet":
        over += [f"data.decode_size={source}", "finetune.view.kind=resized_crop", "data.mean=[0.485,0.456,0.406]",
                 "data.std=[0.229,0.224,0.225]"]
    cfg = load_config(None, over)
    # One global batch for SimCLR; MixMatch splits the set in halves (epsilon 0.5), each
    # at least one global batch.
    data = memory_data(cfg, dist, batch if name == "pretrain" else 2 * batch, source)
    stage = stages.build(cfg, name, run_dir, dist, data)
    stage.on_epoch_start(0)  # MixMatch: the split (one eval pass over the set) and its loaders
    batches = iter(stage.batches(0))
    first = next(batches)
    getattr(batches, "close", lambda: None)()
    # The engine's CUDA loaders deliver pinned host batches copied without blocking: the
    # same batch, pinned once, is copied again at every step (timed as the batch's wait).
    host = _map(first, lambda t: t.pin_memory()) if cuda else first
    copies = iter(lambda: _map(host, lambda t: t.to(dev, non_blocking=True)), None)
    r = time_steps(stage, s["warmup"], s["timed"][family], dev, batches=copies, count=True)
    ips, per_rank = stage.images_per_step, getattr(stage, "per_rank", None) or stage.batching.per_rank
    total = sum(map(sum, (r[k] for k in SPLIT.values())))
    result = {
        "family": family, "stage": name, "kind": "simclr" if name == "pretrain" else "mixmatch", "arch": arch,
        "width": width, "image_size": size, "source_size": source, "batch": batch, "precision": precision,
        "images_per_step": ips, "images_per_s": statistics.median(r["images_per_s"]),
        "images_per_s_by_step": r["images_per_s"],
        "split_ms": {part: statistics.median(r[k]) * 1e3 for part, k in SPLIT.items()},
        "split_share": {part: sum(r[k]) / total for part, k in SPLIT.items()},
        "flops_per_step": r["flops_per_step"],
        "flops_per_step_flops_py": _flops_estimate(name, arch, size, width, per_rank,
                                                   getattr(stage.config, "k_views", 2)),
        "host_syncs_per_step": r["host_syncs_per_step"], "host_syncs": r["host_syncs"],
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None,
        "loss": r["loss"], "loss_finite": math.isfinite(r["loss"])}
    result["bf16_peak_share"] = result["images_per_s"] * r["flops_per_step"] / ips / peak
    del stage, data, first, copies
    free_memory()
    return result


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """One SimCLR and one MixMatch step of the real stages, CIFAR and ImageNet size, bf16 and fp32."""
    import torch
    from benchmarks.step import matmul_ceiling
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown
    p = Progress(progress, deadline)
    s = SIZES[mode(smoke)]["steps"]
    dev = device(smoke)
    base = load_config(None, [f"device={dev.type}", "logging.progress=false", "attack.name=none"])
    dist = init_distributed(base.device, base.distributed)  # cuDNN autotuning and TF32 as a run sets them
    # The ceiling the shares refer to: the best of three measurements of a large bf16 matmul.
    peak = max(matmul_ceiling(dist.device, "bf16", quick=smoke) for _ in range(3))
    p.data.update(device=str(dist.device), bf16_matmul_peak_flops=peak,
                  settings={**s, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "data": "MemoryData, random uint8"})
    if dev.type != "cuda":
        p.cuda_only("peak_memory", "needs CUDA (torch.cuda.max_memory_allocated)")
        p.cuda_only("data_copy", "needs CUDA: no host-to-device copy on the CPU (its share is the no-op .to)")
        p.cuda_only("cuda_events", "needs CUDA: the split is timed with perf_counter on the CPU")
        p.cuda_only("bf16_peak", "needs CUDA: the peak here is the CPU's bf16 matmul, not a GPU's")
    work = Path(tempfile.mkdtemp(prefix="dbd-gpu-steps-"))
    try:
        for precision in ("bf16", "fp32"):
            for case in s["cases"]:
                family, name, _, _, size, _, batch = case
                key = f"{family}{size}/{'simclr' if name == 'pretrain' else 'mixmatch'}/b{batch}/{precision}"
                p.case(key, lambda case=case, precision=precision: _time_step(case, precision, s, dist, peak, work),
                       kind=f"{family}/{name}/{batch}")
    finally:
        shutdown()
    return p.finish()


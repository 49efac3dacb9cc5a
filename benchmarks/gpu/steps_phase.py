"""Phase 3, ``steps``: one SimCLR step and one MixMatch step of the real stages
(``engine.pipeline.make_stage`` over ``MemoryData``) at CIFAR size (CIFAR ResNet-18, 32 px)
and ImageNet size (torchvision ResNet-18, 224 px views from 256 px sources), in bf16 and
fp32: images/s, share of the measured bf16 matmul peak, host syncs per step, peak memory,
and the step split into data copy, views and model by ``step.time_stage`` on CUDA events."""
from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.gpu.common import SIZES, Progress, device, free_memory, memory_data, mode
from benchmarks.harness import sync

IMAGENET_NORM = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]
SPLIT = {"copy": "wait_s", "views": "views_s", "model": "model_s"}  # the split's parts: time_stage's


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
    # backward over the labelled batch and its K unlabelled views; the linear head is
    # left out (under 0.1 % of the backbone).
    return k_views * per_rank * c["forward"] + (1 + k_views) * per_rank * c["forward_backward"]


def _step_config(case, precision: str, device: str, run_dir: Path):
    from engine.config import load_config

    family, stage, arch, width, size, source, batch = case
    over = [f"device={device}", "logging.progress=false", "attack.name=none", f"model.arch={arch}",
            f"model.width={width}", f"data.image_size={size}", f"precision={precision}", f"run_dir={run_dir}",
            f"pretrain.batch_size={batch}" if stage == "pretrain" else f"finetune.batch_size={batch}"]
    if family == "imagenet":
        over += [f"data.decode_size={source}", "finetune.view.kind=resized_crop", *IMAGENET_NORM]
    return load_config(None, over)


def _time_step(case, precision: str, s: dict, dist, peak: float, work: Path) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import stages
    from benchmarks.step import clock_for, time_stage
    from engine.runtime.host_sync import HostSyncCounter

    family, name, arch, width, size, source, batch = case
    dev = dist.device
    cuda = dev.type == "cuda"
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cfg = _step_config(case, precision, dev.type, run_dir)
    # One global batch for SimCLR; MixMatch splits the set in halves (epsilon 0.5), each
    # at least one global batch.
    data = memory_data(cfg, dist, batch if name == "pretrain" else 2 * batch, source)
    stage = stages.build(cfg, name, run_dir, dist, data)
    stage.on_epoch_start(0)  # MixMatch: the split (one eval pass over the set) and its loaders
    batches = iter(stage.batches(0))
    first = next(batches)
    getattr(batches, "close", lambda: None)()
    # The engine's CUDA loaders deliver pinned host batches copied without blocking
    # (ToDevice): the same batch, pinned once, is copied again at every step, and
    # time_stage times that copy as its wait for the batch.
    host = _map(first, lambda t: t.pin_memory()) if cuda else first
    sizes = []
    _map(host, lambda t: sizes.append(t.numel() * t.element_size()))
    copy_bytes = sum(sizes)
    copies = iter(lambda: _map(host, lambda t: t.to(dev, non_blocking=True)), None)
    warm, timed = s["warmup"], s["timed"][family]
    t0 = time.perf_counter()
    for k in range(warm):  # at the timed batch: Triton compiles, cuDNN picks its algorithms
        stage.update(stage.prepare(next(copies), 0, k), 0, k)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    with HostSyncCounter() as syncs, FlopCounterMode(display=False) as flops:
        out = stage.update(stage.prepare(next(copies), 0, warm), 0, warm)
    loss = float(out["loss"])
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    w0 = time.perf_counter()
    r = time_stage(stage, 0, timed, dev, clock=clock_for(dev), batches=copies, start=warm + 1)
    wall = time.perf_counter() - w0  # time_stage waits for the device at its end
    ips = stage.images_per_step
    per_rank = getattr(stage, "per_rank", None) or stage.batching.per_rank
    step_flops = float(flops.get_total_flops())
    rate = ips * timed / wall
    total = sum(map(sum, (r[k] for k in SPLIT.values())))
    result = {
        "family": family, "stage": name, "kind": "simclr" if name == "pretrain" else "mixmatch", "arch": arch,
        "width": width, "image_size": size, "source_size": source, "batch": batch, "precision": precision,
        "images_per_step": ips, "warmup_steps": warm, "timed_steps": timed, "warmup_s": warmup_s,
        "images_per_s": rate, "images_per_s_by_step": r["images_per_s"],
        "step_ms": statistics.median(sum(x) for x in zip(*(r[k] for k in SPLIT.values()))) * 1e3,
        "split_ms": {part: statistics.median(r[k]) * 1e3 for part, k in SPLIT.items()},
        "split_share": {part: sum(r[k]) / total for part, k in SPLIT.items()},
        "copy_bytes": copy_bytes,
        "copy_gb_per_s": copy_bytes / max(statistics.median(r["wait_s"]), 1e-9) / 1e9 if cuda else None,
        "flops_per_step": step_flops,
        "flops_per_step_flops_py": _flops_estimate(name, arch, size, width, per_rank,
                                                   getattr(stage.config, "k_views", 2)),
        "bf16_peak_share": rate * (step_flops / ips) / peak,
        "host_syncs_per_step": len(syncs), "host_syncs": syncs.summary(),
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None,
        "loss": loss, "loss_finite": math.isfinite(loss),
    }
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
                  settings={"warmup": s["warmup"], "timed": s["timed"],
                            "cases": [dict(zip(("family", "stage", "arch", "width", "size", "source", "batch"), c))
                                      for c in s["cases"]],
                            "cudnn_benchmark": torch.backends.cudnn.benchmark,
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

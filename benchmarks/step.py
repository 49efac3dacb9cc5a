"""Training images/second of the real stages' steps, and where a step's time goes.

1. Per stage, backend and precision: the pretrain (SimCLR), linear and fine-tuning
   (MixMatch) stages, built by ``engine.pipeline.make_stage`` over a synthetic poisoned
   CIFAR-size ``.beton``, step on their own loaders. Each step is timed in three parts,
   each synchronised with the device:
   - data wait: blocked on the stage's next batch (the loader prefetches in the
     background, so this is the loading the step could not hide);
   - views: ``stage.prepare`` (the batch to the device, the ``kernels`` views);
   - model: ``stage.update`` (forward, loss, backward, optimizer step).
   Warm-up steps at the timed batch size come first (loader compilation, Triton's
   kernel compilation, cuDNN's choices); the median over the timed steps is reported.
   The SimCLR step's compute ceiling share: images/s x FLOPs per image (two views,
   forward + backward, benchmarks/flops.py) over the device's measured matmul FLOP/s
   in the same precision; on a GPU, the figure the >= 50 % target is stated for.
2. ``simclr_model_step/...``: the pretrain stage's ``update`` alone (its views made once
   by ``prepare``) per backend, precision, torch.compile and world size. On CPU the
   world sizes share the cores (world size 2 is two gloo processes with half each, at
   the same global batch: strong scaling).
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks import stages
from benchmarks.harness import measurement, pin_torch_threads, run_child, sync, target

KINDS = {"simclr": "pretrain", "linear": "linear", "mixmatch": "finetune"}  # figure name: stage
# CPU: as recorded in RESULTS.md. GPU: a global batch of 512 at 32 px for every stage
# (MixMatch: 256 labelled + 256 unlabelled) and the full-width ResNet-18.
CPU = dict(width=16, n=5120, batch=dict(simclr=256, linear=128, mixmatch=64), warmup=2, steps=5,
           grid=dict(width=64, global_batch=32, warmup=1, steps=2, reps=3, compile="ddp/fp32"))
GPU = dict(width=64, n=10240, batch=dict(simclr=512, linear=512, mixmatch=256), warmup=3, steps=10,
           grid=dict(width=64, global_batch=512, warmup=3, steps=5, reps=5, compile="all"))
QUICK = dict(width=4, n=256, batch=dict(simclr=16, linear=16, mixmatch=16), warmup=1, steps=2,
             grid=dict(width=4, global_batch=16, warmup=1, steps=1, reps=1, compile="none"))


def combos(cuda: bool, quick: bool) -> list[tuple[str, str]]:
    if quick:  # DeepSpeed's first start JIT-builds a CPU communication op (minutes)
        return [("ddp", "fp32")]
    return [(b, p) for b in ("ddp", "deepspeed") for p in (("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"))]


def matmul_ceiling(device: torch.device, precision: str, quick: bool) -> float:
    """Measured FLOP/s of a large square matmul in ``precision``: the device's practical ceiling."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 512 if quick else (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)
    sync(device)
    reps = 3 if device.type == "cpu" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


class HostClock:
    """``perf_counter`` after waiting for the device: each mark follows the work before it."""

    def __init__(self, device):
        self.device = device

    def mark(self) -> float:
        sync(self.device)
        return time.perf_counter()

    @staticmethod
    def seconds(a: float, b: float) -> float:
        return b - a


class CudaEventClock:
    """CUDA events on the current stream: marks cost no host sync, and are read once the
    device has caught up (``time_stage`` synchronises after its last step)."""

    @staticmethod
    def mark():
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    @staticmethod
    def seconds(a, b) -> float:
        return a.elapsed_time(b) / 1e3


def clock_for(device) -> HostClock | CudaEventClock:
    """CUDA events on a GPU, the host clock elsewhere (where every op has finished when it returns)."""
    return CudaEventClock() if torch.device(device).type == "cuda" else HostClock(device)


def time_stage(stage, warmup: int, steps: int, device, clock=None, batches=None, start: int = 0) -> dict:
    """Step by step: the wait for the batch, ``prepare`` and ``update`` apart, timed by
    ``clock`` (``mark()``, ``seconds(a, b)``; default: ``HostClock``). ``batches``: an
    iterator of the batches to step on; default: the stage's first epoch (begun here).
    Step indices count from ``start``."""
    clock = clock or HostClock(device)
    own = batches is None
    if own:
        stage.on_epoch_start(0)
        batches = iter(stage.batches(0))
    marks = []
    for k in range(start, start + warmup + steps):
        m0 = clock.mark()
        batch = next(batches)
        m1 = clock.mark()
        x = stage.prepare(batch, 0, k)
        m2 = clock.mark()
        stage.update(x, 0, k)
        marks.append((m0, m1, m2, clock.mark()))
    if own:
        getattr(batches, "close", lambda: None)()  # the loader's threads end with the epoch
    sync(device)
    wait, views, model = ([clock.seconds(m[i], m[i + 1]) for m in marks[warmup:]] for i in range(3))
    total = sum(wait) + sum(views) + sum(model)
    return {"images_per_s": [stage.images_per_step / (w + v + m) for w, v, m in zip(wait, views, model)],
            "data_wait_share": sum(wait) / total, "views_share": sum(views) / total,
            "model_share": sum(model) / total, "wait_s": wait, "views_s": views, "model_s": model}


def model_step_rank(root: str, grid: list[dict], s: dict, device: str, threads: int) -> dict:
    """One rank of the model-step grid: each configuration's pretrain stage, its ``update``
    on views made once, timed between barriers (started by ``harness.run_child``)."""
    from engine.runtime.launch import barrier, shutdown

    pin_torch_threads(threads if device == "cpu" else None)
    kw = dict(device=device, width=s["width"], workers=1, extra=[f"pretrain.batch_size={s['global_batch']}"])
    first = "deepspeed" if any(c["backend"] == "deepspeed" for c in grid) else "ddp"
    dist, data = stages.open_run(stages.config(root, backend=first, **kw))
    run_dir = tempfile.mkdtemp(prefix="dbd-bench-step-")
    results = {}
    try:
        for c in grid:
            stage = stages.build(stages.config(root, backend=c["backend"], precision=c["precision"],
                                               compile=c["compile"], **kw), "pretrain", run_dir, dist, data)
            per_rank = s["global_batch"] // dist.world_size
            images = torch.randint(0, 256, (per_rank, 32, 32, 3), dtype=torch.uint8,
                                   generator=torch.Generator().manual_seed(dist.rank))
            x = stage.prepare((images,), 0, 0)

            def window(n: int, first_step: int) -> float:
                sync(dist.device)
                barrier()
                t0 = time.perf_counter()
                for k in range(n):
                    stage.update(x, 0, first_step + k)
                sync(dist.device)
                barrier()
                return time.perf_counter() - t0

            warm = window(s["warmup"], 0)
            reps = [s["global_batch"] * s["steps"] / window(s["steps"], 1000 * (r + 1)) for r in range(s["reps"])]
            results[grid_key(c, dist.world_size)] = {"reps": reps, "warmup_seconds": round(warm, 2)}
    finally:
        shutdown()
    return results


def grid_key(c: dict, world: int) -> str:
    return f"ws{world}/{c['backend']}/{c['precision']}/{'compile' if c['compile'] else 'eager'}"


def model_step_grid(root: str, s: dict, device: torch.device, quick: bool) -> dict:
    cuda = device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worlds = [1] if quick or (cuda and torch.cuda.device_count() < 2) else [1, 2]
    out = {}
    for world in worlds:
        # torch.compile of a ResNet-18 forward+backward takes minutes on a small CPU: there
        # only ddp/fp32 is compiled.
        grid = [{"backend": b, "precision": p, "compile": k} for b, p in combos(cuda, quick) for k in (False, True)
                if not k or s["compile"] == "all" or s["compile"] == f"{b}/{p}"]
        t0 = time.time()
        threads = max(1, cores // world)
        out.update(run_child("benchmarks.step:model_step_rank",
                             dict(root=root, grid=grid, s=s, device=device.type, threads=threads),
                             world=world, threads=threads, timeout=240 if quick else 1500))
        print(f"[step] model step, world size {world}: {len(grid)} configurations in {time.time() - t0:.0f} s",
              flush=True)
    return out


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict:
    """``threads``: torch intra-op threads, the same for every configuration (default: the
    loader thread count, which is what FFCV sets in the engine)."""
    from benchmarks.flops import count
    from benchmarks.synthetic import cifar_like
    from engine.runtime.launch import shutdown

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    s = QUICK if quick else (GPU if cuda else CPU)
    workers = 1 if quick else min(os.cpu_count() or 1, 16)
    # Pinned for every configuration: DeepSpeed's CPU accelerator would otherwise drop
    # its runs to 1 thread while DDP runs keep FFCV's count, and compare the two unfairly.
    threads = pin_torch_threads(threads or workers)
    bench = cifar_like(s["n"])
    grid = combos(cuda, quick)
    kw = dict(device=dev.type, width=s["width"], workers=workers,
              extra=[f"{KINDS[k]}.batch_size={b}" for k, b in s["batch"].items()])
    dist, data = stages.open_run(stages.config(
        bench.root, backend="deepspeed" if any(b == "deepspeed" for b, _ in grid) else "ddp", **kw))
    flops_simclr = 2 * count("cifar_resnet18", 32, head="simclr", width=s["width"])["forward_backward"]
    measurements, breakdown, ceilings, notes = {}, {}, {}, []
    run_dir = tempfile.mkdtemp(prefix="dbd-bench-step-")
    for backend, precision in grid:
        key = f"{backend}/{precision}"
        cfg = stages.config(bench.root, backend=backend, precision=precision, **kw)
        for kind, name in KINDS.items():
            try:
                stage = stages.build(cfg, name, run_dir, dist, data)
            except Exception as e:  # e.g. DeepSpeed unavailable on this machine: keep the others
                notes.append(f"{kind}/{key} could not run: {type(e).__name__}: {e}")
                continue
            torch.set_num_threads(threads)
            r = time_stage(stage, s["warmup"], s["steps"], dev)
            del stage
            if cuda:
                torch.cuda.empty_cache()
            m = measurements[f"{kind}/{key}/images_per_s"] = measurement("images/s", r["images_per_s"])
            if kind == "simclr":
                ceilings[precision] = ceilings.get(precision) or matmul_ceiling(dev, precision, quick)
                m["compute_ceiling_share"] = m["median"] * flops_simclr / ceilings[precision]
            measurements[f"{kind}/{key}/data_wait_share"] = {
                "unit": "share of step time", "median": r["data_wait_share"],
                "reps": [w / (w + v + md) for w, v, md in zip(r["wait_s"], r["views_s"], r["model_s"])]}
            breakdown[f"{kind}/{key}"] = {k: v for k, v in r.items() if k != "images_per_s"}
    shutdown()
    if not measurements:
        raise RuntimeError("no stage could run a step: " + "; ".join(notes))
    grid_results = model_step_grid(str(bench.root), s["grid"], dev, quick)
    for k, v in grid_results.items():
        measurements[f"simclr_model_step/{k}"] = measurement("images/s", v["reps"], warmup_seconds=v["warmup_seconds"])

    targets, not_measured = [], []
    head = measurements.get(f"simclr/ddp/{'bf16' if cuda else 'fp32'}/images_per_s")
    if cuda and head is not None and s["width"] == 64:
        targets.append(target("ResNet-18 SimCLR step, share of the compute ceiling (bf16 matmul)",
                              head["compute_ceiling_share"], ">=", 0.5))
    else:
        not_measured.append("the GPU SimCLR step's share of the compute ceiling (>= 50 % target): no GPU in this run")
    if quick:
        not_measured.append("quick mode: DDP fp32 only, world size 1, no torch.compile")
    notes += [f"model: cifar_resnet18 width {s['width']} (model-step grid: width {s['grid']['width']})",
              "data: synthetic CIFAR-size raw .beton, BadNets 10 % poisoned; the fine-tuning stage's loaders "
              "read its own split (epsilon 0.5) of an untrained model"]
    return {"unit": "images/s", "measurements": measurements, "breakdown": breakdown, "model_step": grid_results,
            "settings": {**s, "quick": quick, "device": str(dev), "workers": workers, "combos": grid,
                         "flops_per_simclr_image": flops_simclr, "matmul_ceiling_flops": ceilings,
                         "torch_threads": threads},
            "targets": targets, "not_measured": not_measured, "notes": notes}

"""Training images/second per DBD stage, backend and precision, and where step time goes.

Each stage's step (benchmarks/rigs.py: the engine's own parts and settings) runs on a
real, poisoned FFCV loader over a synthetic CIFAR-size set. Every step is split into

- data wait: blocked in the loader's ``next()`` (its background thread prefetches, so
  this is the part of loading that the step could not hide),
- views: the ``kernels`` views cut on the device,
- model: forward, loss, backward, optimizer step,

each synchronised with the device. Figures are per step after warm-up steps (which
also absorb the loaders' numba compilation); the median over steps is reported.

The SimCLR step's compute ceiling share: images/s x FLOPs per image (two views,
forward + backward, benchmarks/flops.py) over the device's measured matmul throughput
in the same precision. On a GPU this is the figure the >= 50 % target is stated for.

benchmarks/step.py (the SimCLR model step alone, views precomputed, per backend,
precision, torch.compile and world size) runs as part of the full benchmark; its
result is kept under ``simclr_step`` and its figures as ``simclr_model_step/...``.
"""
from __future__ import annotations

import inspect
import itertools
import os
import time

import torch

from benchmarks.measure import measurement, pin_torch_threads, target
from benchmarks.rigs import LinearRig, MixMatchRig, SimCLRRig, make_config, split_halves, start, sync

CPU_FULL = dict(width=16, simclr_batch=256, linear_batch=128, mixmatch_batch=64, warmup=2, steps=5, n=5120,
                mixmatch_split=True)
GPU_FULL = dict(width=64, simclr_batch=512, linear_batch=128, mixmatch_batch=64, warmup=3, steps=10, n=5120,
                mixmatch_split=True)
# Quick: one batch size and no labelled/unlabelled split, so two loaders serve every
# stage (each FFCV loader costs a numba compilation on its first epoch).
QUICK = dict(width=4, simclr_batch=16, linear_batch=16, mixmatch_batch=16, warmup=1, steps=2, n=256,
             mixmatch_split=False)


def combos(device: torch.device, quick: bool) -> list[tuple[str, str]]:
    if quick:
        # DeepSpeed's first start on a machine JIT-builds a CPU communication op
        # (minutes): not for a smoke run.
        return [("ddp", "fp32")]
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32", "bf16"]
    return [(b, p) for b in ("ddp", "deepspeed") for p in precisions]


def matmul_ceiling(device: torch.device, precision: str, quick: bool) -> float:
    """Measured FLOP/s of a large square matmul in ``precision``: the device's practical ceiling."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    n = 512 if quick else (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    reps = 3 if device.type == "cpu" else 20
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.matmul(a, b)
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _cycle(loader, first_epoch: int = 0):
    """Endless batches over epochs, as the fine-tuning stage cycles its loaders."""
    for epoch in itertools.count(first_epoch):
        loader.next_epoch = epoch
        yield from loader


def time_steps(next_batch, inputs, train, images_per_step: int, warmup: int, steps: int,
               device: torch.device) -> dict:
    waits, views, models, rates = [], [], [], []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        x = inputs(batch, k)
        sync(device)
        t2 = time.perf_counter()
        train(x, k)
        sync(device)
        t3 = time.perf_counter()
        if k >= warmup:
            waits.append(t1 - t0)
            views.append(t2 - t1)
            models.append(t3 - t2)
            rates.append(images_per_step / (t3 - t0))
    total = sum(waits) + sum(views) + sum(models)
    return {"images_per_s": rates, "data_wait_share": sum(waits) / total, "views_share": sum(views) / total,
            "model_share": sum(models) / total, "wait_s": waits, "views_s": views, "model_s": models}


def _loader(bench, runtime, batch: int, workers: int, indices=None, seed: int = 0):
    from engine.data.loaders import LoaderSpec, make_loader

    return make_loader(LoaderSpec(root=str(bench.root), split="train", batch_size=batch, shuffle=True,
                                  drop_last=True, seed=seed, num_workers=workers, indices=indices),
                       poison=runtime.train_ops())


def step_py(quick: bool, device: torch.device) -> tuple[dict | None, str]:
    """benchmarks/step.py's SimCLR model-step grid, at the size this suite can afford.

    Its quick grid runs every backend x precision eager plus torch.compile for ddp/fp32;
    its full grid compiles all configurations, minutes each on a CPU. So: full grid on a
    GPU, its quick grid on CPU, and nothing in the suite's quick mode (even one CPU
    compilation takes over a minute).
    """
    if quick:
        return None, "benchmarks/step.py (SimCLR model step with torch.compile and world size 2) runs in full mode only"
    from benchmarks import step as step_module

    cuda = device.type == "cuda"
    params = inspect.signature(step_module.run).parameters
    kwargs = {"quick": not cuda} if "quick" in params else {}
    result = step_module.run(**kwargs)
    return result, (f"benchmarks/step.py ran its {'full' if cuda else 'quick'} grid"
                    + ("" if cuda else ": every backend x precision eager, torch.compile for ddp/fp32 only "
                                       "(its full grid compiles every configuration, minutes each on a CPU)"))


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict:
    """``threads``: torch intra-op threads, the same for every configuration (default: the
    loader thread count, which is what FFCV sets in the engine)."""
    from benchmarks.flops import count
    from benchmarks.synthetic import cifar_like, poison_runtime

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = QUICK if quick else (GPU_FULL if dev.type == "cuda" else CPU_FULL)
    workers = 1 if quick else min(os.cpu_count() or 1, 16)
    # Pinned for every configuration: DeepSpeed's CPU accelerator would otherwise drop
    # its runs to 1 thread while DDP runs keep FFCV's count, and compare the two unfairly.
    threads = pin_torch_threads(threads or workers)
    bench = cifar_like(s["n"])
    runtime, _ = poison_runtime(bench, image_size=32, decode_size=0, num_workers=workers)
    labelled, unlabelled = split_halves(bench.count) if s["mixmatch_split"] else (None, None)
    # Loaders live for the whole benchmark, shared where the settings allow: FFCV
    # compiles a loader's pipeline on its first epoch, a cost of no configuration's steps.
    cache: dict = {}

    def stream(batch: int, indices, seed: int):
        key = (batch, None if indices is None else id(indices), seed)
        if key not in cache:
            cache[key] = _cycle(_loader(bench, runtime, batch, workers, indices, seed=seed))
        return cache[key]

    streams = {"simclr": stream(s["simclr_batch"], None, 0), "linear": stream(s["linear_batch"], None, 0),
               "x": stream(s["mixmatch_batch"], labelled, 0 if labelled is None else 101),
               "u": stream(s["mixmatch_batch"], unlabelled, 202)}

    flops_simclr = 2 * count("cifar_resnet18", 32, head="simclr", width=s["width"])["forward_backward"]
    measurements: dict = {}
    breakdown: dict = {}
    ceilings: dict = {}
    failures: dict = {}
    grid = combos(dev, quick)
    # One process for every configuration, as in a run: DeepSpeed keeps references to the
    # process group it first saw, so the group is created once (DeepSpeed needs one even
    # for a single process; DDP ignores it at world size 1).
    first = "deepspeed" if any(b == "deepspeed" for b, _ in grid) else "ddp"
    dist = start(make_config(backend=first, device=dev.type, width=s["width"], data_root=str(bench.root),
                             num_workers=workers))
    for backend, precision in grid:
        key = f"{backend}/{precision}"
        cfg = make_config(backend=backend, precision=precision, device=dev.type, width=s["width"],
                          data_root=str(bench.root), num_workers=workers)
        try:
            rigs = {"simclr": SimCLRRig(cfg, dist, s["simclr_batch"]),
                    "linear": LinearRig(cfg, dist, s["linear_batch"]),
                    "mixmatch": MixMatchRig(cfg, dist, s["mixmatch_batch"])}
        except Exception as e:  # e.g. DeepSpeed unavailable on this machine: keep the others
            failures[key] = f"{type(e).__name__}: {e}"
            continue
        torch.set_num_threads(threads)
        sim, lin, mm = rigs["simclr"], rigs["linear"], rigs["mixmatch"]
        runs = {
            "simclr": time_steps(lambda: next(streams["simclr"]), lambda b, k: sim.inputs(b[0], 0, k),
                                 lambda x, k: sim.train(x), sim.images_per_step, s["warmup"], s["steps"], dev),
            "linear": time_steps(lambda: next(streams["linear"]), lambda b, k: lin.inputs(b[0], b[1], 0, k),
                                 lambda x, k: lin.train(*x), lin.images_per_step, s["warmup"], s["steps"], dev),
            "mixmatch": time_steps(lambda: (next(streams["x"]), next(streams["u"])),
                                   lambda b, k: mm.inputs(b[0][0], b[0][1], b[1][0], 0, k),
                                   lambda x, k: mm.train(*x, 0, k), mm.images_per_step, s["warmup"], s["steps"],
                                   dev),
        }
        del rigs, sim, lin, mm
        ceilings[precision] = ceilings.get(precision) or matmul_ceiling(dev, precision, quick)
        for stage, r in runs.items():
            m = measurement("images/s", r["images_per_s"])
            if stage == "simclr":
                m["compute_ceiling_share"] = m["median"] * flops_simclr / ceilings[precision]
            measurements[f"{stage}/{key}/images_per_s"] = m
            measurements[f"{stage}/{key}/data_wait_share"] = {
                "unit": "share of step time", "median": r["data_wait_share"],
                "reps": [w / (w + v + md) for w, v, md in zip(r["wait_s"], r["views_s"], r["model_s"])]}
            breakdown[f"{stage}/{key}"] = {k: r[k] for k in ("data_wait_share", "views_share", "model_share",
                                                             "wait_s", "views_s", "model_s")}
    from engine.runtime.launch import shutdown

    shutdown()
    if not measurements:
        raise RuntimeError("no backend could run a step: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))

    targets, not_measured = [], []
    simclr_ddp = measurements.get(f"simclr/ddp/{'bf16' if dev.type == 'cuda' else 'fp32'}/images_per_s")
    if dev.type == "cuda" and simclr_ddp is not None and s["width"] == 64:
        targets.append(target("ResNet-18 SimCLR step, share of the compute ceiling (bf16 matmul)",
                              simclr_ddp["compute_ceiling_share"], ">=", 0.5))
    else:
        not_measured.append("the GPU SimCLR step's share of the compute ceiling (>= 50 % target): no GPU in this run")
    if quick:
        not_measured.append("quick mode: DDP fp32 only (DeepSpeed and bf16 run in full mode)")
    simclr_step, step_note = step_py(quick, dev)
    if simclr_step is not None:
        unit = "images/s"
        for k, v in simclr_step.get("results", {}).items():
            if v.get("reps"):
                measurements[f"simclr_model_step/{k}"] = measurement(unit, v["reps"],
                                                                      warmup_seconds=v.get("warmup_seconds"))
    notes = [f"model: cifar_resnet18 width {s['width']}"
             + ("" if s["width"] == 64 else " (narrower than ResNet-18's 64 to keep CPU runs short)"),
             "data: synthetic CIFAR-size raw .beton, BadNets 10 % poisoned; MixMatch reads two loaders"
             + (" over a 50/50 labelled/unlabelled split, as the fine-tuning stage does after its split"
                if s["mixmatch_split"] else " over the whole set (quick mode)")]
    notes.append(step_note)
    for k, v in failures.items():
        notes.append(f"{k} could not run: {v}")
    return {
        "unit": "images/s",
        "settings": {**s, "quick": quick, "device": str(dev), "workers": workers, "combos": combos(dev, quick),
                     "flops_per_simclr_image": flops_simclr, "matmul_ceiling_flops": ceilings,
                     "torch_threads": threads},
        "measurements": measurements, "breakdown": breakdown, "simclr_step": simclr_step,
        "targets": targets, "not_measured": not_measured, "notes": notes,
    }


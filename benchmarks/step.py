"""Training images/second of the real stages' steps, where a step's time goes, and the
SimCLR model step per backend, precision, torch.compile and world size with its weak
scaling (what it measures: docs/benchmarks.md). ``time_steps`` is also the GPU check's."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks import stages
from benchmarks.harness import measurement, pin_torch_threads, run_child, sync, target

KINDS = {"simclr": "pretrain", "linear": "linear", "mixmatch": "finetune"}  # figure name: stage
# CPU: as recorded in RESULTS.md. GPU: a global batch of 512 at 32 px for every stage
# (MixMatch: 256 labelled + 256 unlabelled) and the full-width ResNet-18. The grid's
# ``batch`` is per rank at every world size (weak scaling).
CPU = dict(width=16, n=5120, batch=dict(simclr=256, linear=128, mixmatch=64), warmup=2, steps=5,
           grid=dict(width=64, batch=32, warmup=1, steps=2, reps=3, compile="ddp/fp32"))
GPU = dict(width=64, n=10240, batch=dict(simclr=512, linear=512, mixmatch=256), warmup=3, steps=10,
           grid=dict(width=64, batch=512, warmup=3, steps=5, reps=5, compile="all"))
QUICK = dict(width=4, n=256, batch=dict(simclr=16, linear=16, mixmatch=16), warmup=1, steps=2,
             grid=dict(width=4, batch=8, warmup=1, steps=1, reps=1, compile="none"))


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


def _clock(device):
    """``(mark, seconds)``: CUDA events on a GPU (marks cost no host sync; read once the
    device has caught up), else ``perf_counter`` after waiting for the device."""
    if torch.device(device).type == "cuda":
        def event():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return event, lambda a, b: a.elapsed_time(b) / 1e3
    return lambda: (sync(device), time.perf_counter())[1], lambda a, b: b - a


def time_steps(stage, warmup: int, steps: int, device, batches=None, count: bool = False) -> dict:
    """``warmup`` untimed steps, then ``steps`` timed ones, each split into the wait for the
    batch, ``prepare`` (to the device, the views) and ``update`` (forward, loss, backward,
    optimizer). ``batches``: an iterator of batches (default: the stage's first epoch).
    ``count``: one more step first under a host-sync counter and torch's FLOP counter."""
    own = batches is None
    if own:
        stage.on_epoch_start(0)
        batches = iter(stage.batches(0))
    mark, seconds = _clock(device)
    out, marks = {}, []
    for k in range(warmup + count + steps):
        if count and k == warmup:
            from torch.utils.flop_counter import FlopCounterMode
            from engine.runtime.host_sync import HostSyncCounter
            with HostSyncCounter() as syncs, FlopCounterMode(display=False) as flops:
                loss = float(stage.update(stage.prepare(next(batches), 0, k), 0, k)["loss"])
            out.update(flops_per_step=float(flops.get_total_flops()), host_syncs_per_step=len(syncs),
                       host_syncs=syncs.summary(), loss=loss)
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            continue
        m0 = mark()
        batch = next(batches)
        m1 = mark()
        x = stage.prepare(batch, 0, k)
        m2 = mark()
        stage.update(x, 0, k)
        if k >= warmup + count:
            marks.append((m0, m1, m2, mark()))
    if own:
        getattr(batches, "close", lambda: None)()  # the loader's threads end with the epoch
    sync(device)
    wait, views, model = ([seconds(m[i], m[i + 1]) for m in marks] for i in range(3))
    total = sum(wait) + sum(views) + sum(model)
    return {**out, "images_per_s": [stage.images_per_step / (w + v + m) for w, v, m in zip(wait, views, model)],
            "data_wait_share": sum(wait) / total, "views_share": sum(views) / total,
            "model_share": sum(model) / total, "wait_s": wait, "views_s": views, "model_s": model}


def model_step_rank(root: str, grid: list[dict], s: dict, device: str, threads: int) -> dict:
    """One rank of the model-step grid: each configuration's pretrain stage, its ``update``
    on views made once, timed between barriers (started by ``harness.run_child``)."""
    from engine.runtime.launch import barrier, shutdown
    pin_torch_threads(threads if device == "cpu" else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kw = dict(device=device, width=s["width"], workers=1, extra=[f"pretrain.batch_size={s['batch'] * world}"])
    first = "deepspeed" if any(c["backend"] == "deepspeed" for c in grid) else "ddp"
    dist, data = stages.open_run(stages.config(root, backend=first, **kw))
    run_dir = tempfile.mkdtemp(prefix="dbd-bench-step-")
    results = {}
    try:
        for c in grid:
            stage = stages.build(stages.config(root, backend=c["backend"], precision=c["precision"],
                                               compile=c["compile"], **kw), "pretrain", run_dir, dist, data)
            images = torch.randint(0, 256, (s["batch"], 32, 32, 3), dtype=torch.uint8,
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
            reps = [s["batch"] * world * s["steps"] / window(s["steps"], 1000 * (r + 1)) for r in range(s["reps"])]
            results[grid_key(c, world)] = {"reps": reps, "warmup_seconds": round(warm, 2), "threads": threads}
    finally:
        shutdown()
    return results


def grid_key(c: dict, world: int) -> str:
    return f"ws{world}/{c['backend']}/{c['precision']}/{'compile' if c['compile'] else 'eager'}"


def model_step_grid(root: str, s: dict, device: torch.device, quick: bool) -> dict:
    """The grid at world size 1 and, where there are 2 GPUs or on a CPU, 2. Weak scaling:
    every rank gets the same batch and (on a CPU) the same threads at every world size,
    so only the distribution's costs change (2 ranks on a 1-core CPU oversubscribe it)."""
    cuda = device.type == "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    worlds = [1] if cuda and torch.cuda.device_count() < 2 else [1, 2]
    threads = max(1, cores // max(worlds))
    # torch.compile of a ResNet-18 forward+backward takes minutes on a small CPU: there
    # only ddp/fp32 is compiled.
    grid = [{"backend": b, "precision": p, "compile": k} for b, p in combos(cuda, quick) for k in (False, True)
            if not k or s["compile"] == "all" or s["compile"] == f"{b}/{p}"]
    out = {}
    for world in worlds:
        t0 = time.time()
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
            r = time_steps(stage, s["warmup"], s["steps"], dev)
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
    efficiency: dict[str, dict[str, float]] = {}
    for k, v in grid_results.items():
        m = measurements[f"simclr_model_step/{k}"] = measurement("images/s", v["reps"],
                                                                 warmup_seconds=v["warmup_seconds"])
        world, config = k.split("/", 1)
        base = measurement("images/s", grid_results[f"ws1/{config}"]["reps"])["median"]
        w = int(world[2:])
        efficiency.setdefault(config, {})[str(w)] = m["median"] / (w * base)
        measurements[f"simclr_model_step/{k}/weak_scaling_efficiency"] = {
            "unit": "efficiency", "median": m["median"] / (w * base), "reps": [r / (w * base) for r in v["reps"]]}
    targets, not_measured = [], []
    head = measurements.get(f"simclr/ddp/{'bf16' if cuda else 'fp32'}/images_per_s")
    if cuda and head is not None and s["width"] == 64:
        targets.append(target("ResNet-18 SimCLR step, share of the compute ceiling (bf16 matmul)",
                              head["compute_ceiling_share"], ">=", 0.5))
    else:
        not_measured.append("the GPU SimCLR step's share of the compute ceiling (>= 50 % target): no GPU in this run")
    if quick:
        not_measured.append("quick mode: DDP fp32 only, no torch.compile")
    if cuda and "ws2/ddp/fp32/eager" not in grid_results:
        not_measured.append("multi-GPU (NCCL) weak scaling: fewer than 2 GPUs")
    notes += [f"model: cifar_resnet18 width {s['width']} (model-step grid: width {s['grid']['width']}, "
              f"{s['grid']['batch']} images per rank at every world size)",
              "data: synthetic CIFAR-size raw .beton, BadNets 10 % poisoned; the fine-tuning stage's loaders "
              "read its own split (epsilon 0.5) of an untrained model"]
    return {"unit": "images/s", "measurements": measurements, "breakdown": breakdown, "model_step": grid_results,
            "weak_scaling_efficiency": efficiency,
            "settings": {**s, "quick": quick, "device": str(dev), "workers": workers, "combos": grid,
                         "flops_per_simclr_image": flops_simclr, "matmul_ceiling_flops": ceilings,
                         "torch_threads": threads},
            "targets": targets, "not_measured": not_measured, "notes": notes}

"""Training images/second of the real stages' steps per backend, precision and (SimCLR)
torch.compile, and where a step's time goes (what it measures: docs/benchmarks.md).
``time_steps`` and ``matmul_ceiling`` are also the GPU check's."""
from __future__ import annotations

import os
import tempfile
import time

import torch

from benchmarks import stages
from benchmarks.harness import measurement, pin_torch_threads, sync, target

KINDS = {"simclr": "pretrain", "linear": "linear", "mixmatch": "finetune"}  # figure name: stage
# CPU: as recorded in RESULTS.md. GPU: a global batch of 512 at 32 px for every stage
# (MixMatch: 256 labelled + 256 unlabelled) and the full-width ResNet-18. ``compile``: the
# configurations whose SimCLR step is also timed under torch.compile, which takes minutes
# for a ResNet-18 forward+backward on a small CPU.
CPU = dict(width=16, n=5120, batch=dict(simclr=256, linear=128, mixmatch=64), warmup=2, steps=5, compile="ddp/fp32")
GPU = dict(width=64, n=10240, batch=dict(simclr=512, linear=512, mixmatch=256), warmup=3, steps=10, compile="all")
QUICK = dict(width=4, n=256, batch=dict(simclr=16, linear=16, mixmatch=16), warmup=1, steps=2, compile="none")


def combos(cuda: bool, quick: bool, compile: str = "none") -> list[tuple[str, str, bool]]:
    """(backend, precision, compiled) to time; only the SimCLR step runs compiled."""
    if quick:  # DeepSpeed's first start JIT-builds a CPU communication op (minutes)
        return [("ddp", "fp32", False)]
    grid = [(b, p) for b in ("ddp", "deepspeed") for p in (("fp32", "bf16", "fp16") if cuda else ("fp32", "bf16"))]
    return [(b, p, c) for b, p in grid for c in (False, True) if not c or compile in ("all", f"{b}/{p}")]


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


def stage_steps(root, s: dict, dev: torch.device, threads: int, workers: int, quick: bool) -> tuple[dict, dict, list]:
    """Every stage of ``KINDS`` per backend and precision on its own loader (SimCLR also
    compiled where ``s["compile"]`` says): images/s, the data wait's share, the split of a
    step, and the SimCLR step's share of the measured matmul ceiling."""
    grid = combos(dev.type == "cuda", quick, s["compile"])
    kw = dict(device=dev.type, width=s["width"], workers=workers,
              extra=[f"{KINDS[k]}.batch_size={b}" for k, b in s["batch"].items()])
    # DeepSpeed keeps the process group it first saw: open the run with its config if any stage uses it.
    dist, data = stages.open_run(stages.config(root, backend=grid[-1][0], **kw))
    measurements, breakdown, notes, ceilings = {}, {}, [], {}
    run_dir = tempfile.mkdtemp(prefix="dbd-bench-step-")
    for backend, precision, compiled in grid:
        key = f"{backend}/{precision}" + ("/compile" if compiled else "")
        cfg = stages.config(root, backend=backend, precision=precision, compile=compiled, **kw)
        for kind, name in KINDS.items() if not compiled else [("simclr", "pretrain")]:
            try:
                stage = stages.build(cfg, name, run_dir, dist, data)
            except Exception as e:  # e.g. DeepSpeed unavailable on this machine: keep the others
                notes.append(f"{kind}/{key} could not run: {type(e).__name__}: {e}")
                continue
            torch.set_num_threads(threads)
            r = time_steps(stage, s["warmup"], s["steps"], dev, count=kind == "simclr")
            del stage
            m = measurements[f"{kind}/{key}/images_per_s"] = measurement("images/s", r.pop("images_per_s"))
            if kind == "simclr":
                ceilings[precision] = ceilings.get(precision) or matmul_ceiling(dev, precision, quick)
                flops_per_image = r["flops_per_step"] / s["batch"]["simclr"]  # two views' forward and backward
                m["compute_ceiling_share"] = m["median"] * flops_per_image / ceilings[precision]
            measurements[f"{kind}/{key}/data_wait_share"] = {
                "unit": "share of step time", "median": r["data_wait_share"],
                "reps": [w / (w + v + md) for w, v, md in zip(r["wait_s"], r["views_s"], r["model_s"])]}
            breakdown[f"{kind}/{key}"] = r
    from engine.runtime.launch import shutdown
    shutdown()
    if not measurements:
        raise RuntimeError("no stage could run a step: " + "; ".join(notes))
    return measurements, {"breakdown": breakdown, "matmul_ceiling_flops": ceilings}, notes


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict:
    """``threads``: torch intra-op threads, the same for every configuration (default: the
    loader thread count, which is what FFCV sets in the engine)."""
    from benchmarks.synthetic import cifar_like
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    s = QUICK if quick else (GPU if cuda else CPU)
    workers = 1 if quick else min(os.cpu_count() or 1, 16)
    # Pinned for every configuration: DeepSpeed's CPU accelerator would otherwise drop
    # its runs to 1 thread while DDP runs keep FFCV's count, and compare the two unfairly.
    threads = pin_torch_threads(threads or workers)
    bench = cifar_like(s["n"])
    measurements, details, notes = stage_steps(bench.root, s, dev, threads, workers, quick)
    targets, not_measured = [], []
    head = measurements.get(f"simclr/ddp/{'bf16' if cuda else 'fp32'}/images_per_s")
    if cuda and head is not None and s["width"] == 64:
        targets.append(target("ResNet-18 SimCLR step, share of the compute ceiling (bf16 matmul)",
                              head["compute_ceiling_share"], ">=", 0.5))
    else:
        not_measured.append("the GPU SimCLR step's share of the compute ceiling (>= 50 % target): no GPU in this run")
    if quick:
        not_measured.append("quick mode: DDP fp32 only, no torch.compile")
    notes += [f"model: cifar_resnet18 width {s['width']}",
              "data: synthetic CIFAR-size raw .beton, BadNets 10 % poisoned; the fine-tuning stage's loaders "
              "read its own split (epsilon 0.5) of an untrained model"]
    return {"unit": "images/s", "measurements": measurements, **details,
            "settings": {**s, "quick": quick, "device": str(dev), "workers": workers,
                         "combos": combos(cuda, quick, s["compile"]), "torch_threads": threads},
            "targets": targets, "not_measured": not_measured, "notes": notes}

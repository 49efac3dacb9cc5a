"""How the GPU check times what it runs: view pipelines from a uint8 NHWC batch to
normalised float views (the fused kernels, their PyTorch twin, torchvision v2 per sample),
a real stage's steps split into the wait for the batch, the views and the model (CUDA
events on a GPU), and the device's matmul ceiling (docs/benchmarks.md)."""
from __future__ import annotations

import time

import torch

from benchmarks.harness import sync

# One call per batch: warmed up at the timed batch (Triton specialises its kernels on it).
BATCHED = ("fused", "torch_path")


def time_calls(fn, warm, reps: int, device, until: float | None = None) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn`` after one call of ``warm``, each
    synchronised with ``device``; stops early once ``time.time()`` passes ``until``."""
    warm()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
        if until is not None and time.time() > until:
            break
    return out


def measure_views(images, spec, methods: dict, reps: int | dict[str, int], device, until: float | None = None):
    """Two views per image of ``images`` by each of ``methods`` (name -> maker(images, spec)
    -> call), in views/s over ``reps`` calls (one count, or one per method) after a warm-up
    call. The per-sample methods warm up on a few images: a full batch would add minutes
    at 224 px and teach them nothing more."""
    out = {}
    for name, make in methods.items():
        fn = make(images, spec)
        warm = fn if name in BATCHED else make(images[:4], spec)
        times = time_calls(fn, warm, reps[name] if isinstance(reps, dict) else reps, device, until)
        out[name] = {"reps": [2 * len(images) / t for t in times], "seconds": times, "images": len(images)}
    return out


def fused_views(images, spec):
    from kernels import simclr_views
    return lambda: simclr_views(images, spec, seed=0, impl="triton")


def torch_path_views(images, spec):
    from kernels import simclr_views
    return lambda: simclr_views(images, spec, seed=0, impl="torch")


def torchvision_v2_views(images, spec):
    """torchvision.transforms.v2 called once per sample: each image gets its own parameters.
    The default blur (the reference's) sizes each sample's kernel to its sigma; torchvision
    takes one size per call, so it gets the widest one, the same work bound."""
    import torchvision.transforms.v2 as T
    taps = spec.blur_kernel_size or 2 * spec.blur_radius + 1
    pipe = T.Compose([
        T.ToDtype(torch.float32, scale=True),
        T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, interpolation=T.InterpolationMode.BICUBIC,
                            antialias=False),
        T.RandomHorizontalFlip(spec.flip_p),
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(spec.grayscale_p),
        T.RandomApply([T.GaussianBlur(taps, spec.blur_sigma)], p=spec.blur_p),
        T.Normalize(list(spec.mean), list(spec.std))])
    chw = images.permute(0, 3, 1, 2)
    return lambda: [torch.stack([pipe(chw[i]) for i in range(chw.shape[0])]) for _ in range(2)]


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

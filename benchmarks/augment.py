"""Throughput of the SimCLR view pipelines: the fused kernels, the PyTorch path,
torchvision v2 and PIL, from a uint8 NHWC batch to normalised float views (what each
method is and how it is timed: docs/benchmarks.md). ``measure_views`` is also the GPU
check's."""
from __future__ import annotations

import time

import torch

from benchmarks.harness import comparison, measurement, sync, target

# (label, source side, view size): 32 px CIFAR views; 224 px ImageNet views from a 256 px
# source. Both with the default blur, the reference's: each sample's kernel sized to its
# sigma (2*ceil(3*sigma)+1 taps, 13 at sigma 2); torchvision takes one size per call, so it
# gets the widest one, the same work bound.
SIZES = (("32px", 32, 32), ("224px", 256, 224))
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
        out[name] = {"reps": [2 * len(images) / t for t in times], "seconds": times, "images": len(images),
                     "device": "cpu" if name == "pil" else str(device)}
    return out


def fused_views(images, spec):
    from kernels import simclr_views
    return lambda: simclr_views(images, spec, seed=0, impl="triton")


def torch_path_views(images, spec):
    from kernels import simclr_views
    return lambda: simclr_views(images, spec, seed=0, impl="torch")


def torchvision_v2_views(images, spec):
    """torchvision.transforms.v2 called once per sample: each image gets its own parameters."""
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


def pil_views(images, spec):
    from PIL import Image
    from benchmarks.reference import simclr_transform
    pipe = simclr_transform(spec)  # the reference's own PIL pipeline
    # Decoded PIL images are what the reference dataset holds; building them is not timed.
    pils = [Image.fromarray(a) for a in images.cpu().numpy()]
    return lambda: [torch.stack([pipe(im) for im in pils]) for _ in range(2)]


def run(quick: bool = False, device: str = "cpu", threads: int | None = None) -> dict:
    """Views/second of each method at 32 px and 224 px, and the engine's method against each
    other. On CPU, torch runs with ``threads`` intra-op threads (default 1): per-core
    figures, comparable with the single-threaded PIL pipeline the reference scales with
    one loader worker per core, and robust to other processes competing for the cores."""
    from kernels import SimCLRSpec, triton_available
    engine = "fused" if device.startswith("cuda") and triton_available() else "torch_path"
    methods = {engine: fused_views if engine == "fused" else torch_path_views,
               "torchvision_v2": torchvision_v2_views, "pil": pil_views}
    batch, gen, results = 32 if quick else 512, torch.Generator().manual_seed(0), {}
    prev_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        for label, source, size in SIZES:
            images = torch.randint(0, 256, (batch, source, source, 3), dtype=torch.uint8, generator=gen).to(device)
            # The per-sample pipelines take tens of seconds per 224 px repetition on a small CPU.
            reps = {m: 2 if quick else 7 if label == "32px" else 5 if m in BATCHED else 3 for m in methods}
            results[label] = measure_views(images, SimCLRSpec(size=size), methods, reps, device)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev_threads)
    measurements, comparisons, targets = {}, {}, []
    for label, by_method in results.items():
        for name, m in by_method.items():
            measurements[f"{label}/{name}"] = measurement("views/s", m["reps"], device=m["device"])
            if name != engine:
                comparisons[f"{label}/{engine}_vs_{name}"] = comparison("views/s", by_method[engine]["reps"], m["reps"])
        if engine == "fused":
            targets.append(target(f"GPU fused SimCLR view vs torchvision v2 at {label}",
                                  comparisons[f"{label}/fused_vs_torchvision_v2"]["ratio"], ">=", 10.0))
    head = comparisons[f"32px/{engine}_vs_pil"]
    return {
        "unit": "views/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
        "headline": f"32px/{engine}_vs_pil", "engine_method": engine, "results": results,
        "settings": {"batch": batch, "views_per_image": 2, "quick": quick, "device": device,
                     "torch_threads": used_threads},
        "comparisons": comparisons, "measurements": measurements, "targets": targets,
        "not_measured": [] if targets else ["fused Triton kernels and their >= 10x-over-torchvision-v2 GPU target: "
                                            "no GPU in this run"],
    }

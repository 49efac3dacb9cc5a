"""Throughput of the SimCLR view pipelines: fused kernels vs the alternatives.

`run(quick, device)` returns plain JSON-able data and touches no files; running the module
(`python -m benchmarks.augment [--quick] [--device cpu|cuda] [--out FILE]`) prints it and
writes it to FILE when asked.

Every method makes two views per image of a uint8 NHWC batch (what the FFCV loader
delivers) and is timed end to end from that batch to normalised float views on `device`,
so per-sample pipelines pay their own conversions just as they would in a loader:

- fused:          kernels.simclr_views(backend="triton"), CUDA only
- torch_path:     kernels.simclr_views(backend="torch"), the vectorised PyTorch path
- torchvision_v2: torchvision.transforms.v2 called once per sample (per-sample parameters)
- kornia:         kornia.augmentation with same_on_batch=False, whole batch per call
- pil:            torchvision.transforms on PIL images per sample, the DBD reference way
                  (host CPU, one process: the reference spreads it over loader workers)

Figures are the median over repetitions after one warm-up call; every repetition is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

# (label, source side, view size, blur kernel): 32 px CIFAR views; 224 px ImageNet views from
# a 256 px source with the SimCLR blur kernel of ~10% of the view (23 px).
_SIZES = (("32px", 32, 32, 3), ("224px", 256, 224, 23))


def _spec(size: int, kernel: int):
    from kernels import SimCLRSpec

    return SimCLRSpec(size=size, blur_kernel_size=kernel)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, warm, reps: int, device: str) -> list[float]:
    # Warm-up (compilation, autotuning, first-call set-up) on a few images: a full batch
    # would add minutes for the per-sample pipelines at 224 px and teach them nothing more.
    warm()
    _sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _fused(images, spec):
    from kernels import simclr_views

    return lambda: simclr_views(images, spec, seed=0, backend="triton")


def _torch_path(images, spec):
    from kernels import simclr_views

    return lambda: simclr_views(images, spec, seed=0, backend="torch")


def _torchvision_v2(images, spec):
    import torchvision.transforms.v2 as T

    pipe = T.Compose(
        [
            T.ToDtype(torch.float32, scale=True),
            T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                                interpolation=T.InterpolationMode.BICUBIC, antialias=False),
            T.RandomHorizontalFlip(spec.flip_p),
            T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
            T.RandomGrayscale(spec.grayscale_p),
            T.RandomApply([T.GaussianBlur(spec.blur_kernel_size, spec.blur_sigma)], p=spec.blur_p),
            T.Normalize(list(spec.mean), list(spec.std)),
        ]
    )
    chw = images.permute(0, 3, 1, 2)

    def run():
        return [torch.stack([pipe(chw[i]) for i in range(chw.shape[0])]) for _ in range(2)]

    return run


def _kornia(images, spec):
    import kornia.augmentation as K

    pipe = torch.nn.Sequential(
        K.RandomResizedCrop((spec.size, spec.size), scale=spec.scale, ratio=spec.ratio, resample="BICUBIC",
                            align_corners=False),
        K.RandomHorizontalFlip(p=spec.flip_p),
        K.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, p=spec.jitter_p),
        K.RandomGrayscale(p=spec.grayscale_p),
        K.RandomGaussianBlur((spec.blur_kernel_size, spec.blur_kernel_size), spec.blur_sigma, p=spec.blur_p),
        K.Normalize(torch.tensor(spec.mean), torch.tensor(spec.std)),
    ).to(images.device)

    def run():
        x = images.permute(0, 3, 1, 2).float().div_(255)
        return [pipe(x) for _ in range(2)]

    return run


def _pil(images, spec):
    import torchvision.transforms as T
    from PIL import Image

    pipe = T.Compose(
        [
            T.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                                interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(spec.flip_p),
            T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
            T.RandomGrayscale(spec.grayscale_p),
            T.RandomApply([T.GaussianBlur(spec.blur_kernel_size, spec.blur_sigma)], p=spec.blur_p),
            T.ToTensor(),
            T.Normalize(spec.mean, spec.std),
        ]
    )
    # Decoded PIL images are what the reference dataset holds; building them is not timed.
    pils = [Image.fromarray(a) for a in images.cpu().numpy()]

    def run():
        return [torch.stack([pipe(im) for im in pils]) for _ in range(2)]

    return run


def _methods(device: str) -> dict:
    methods = {}
    if device.startswith("cuda"):
        from kernels import triton_available

        if triton_available():
            methods["fused"] = _fused
    methods["torch_path"] = _torch_path
    methods["torchvision_v2"] = _torchvision_v2
    try:
        import kornia  # noqa: F401

        methods["kornia"] = _kornia
    except ImportError:
        pass
    methods["pil"] = _pil
    return methods


def _reps(quick: bool, method: str, label: str) -> int:
    if quick:
        return 2
    if label == "32px":
        return 7
    # The per-sample pipelines take tens of seconds per 224 px repetition on a small CPU.
    return 3 if method in ("torchvision_v2", "kornia", "pil") else 5


def run(quick: bool = False, device: str = "cpu", threads: int | None = None) -> dict:
    """Views/second of each method at 32 px and 224 px; no files written, no global state kept.

    On CPU, torch runs with `threads` intra-op threads (default 1) for the duration of the
    call: per-core figures, comparable with the single-threaded PIL pipeline that the
    reference scales with one loader worker per core, and not at the mercy of other
    processes competing for the cores (spinning OpenMP threads collapse under contention).
    """
    batch = 32 if quick else 512
    load_before = os.getloadavg()
    prev_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        results = _measure(quick, device, batch)
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(prev_threads)
    r32 = results["32px"]
    engine_name = "fused" if "fused" in r32 else "torch_path"
    engine = r32[engine_name]["median"]
    reference = r32["pil"]["median"]
    return {
        "unit": "views/s",
        "batch": batch,
        "views_per_image": 2,
        "quick": quick,
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor()
        or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": used_threads,
        "torch": torch.__version__,
        # Other work on the machine skews CPU figures; the 1-minute load average says how much.
        "loadavg_1min": [load_before[0], os.getloadavg()[0]],
        "results": results,
        "engine_method": engine_name,
        "engine": engine,
        "reference": reference,
        "ratio": engine / reference,
    }


def _measure(quick: bool, device: str, batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    results: dict = {}
    for label, src, size, kernel in _SIZES:
        spec = _spec(size, kernel)
        images = torch.randint(0, 256, (batch, src, src, 3), dtype=torch.uint8, generator=gen).to(device)
        results[label] = {}
        for name, make in _methods(device).items():
            # The PIL pipeline is host-side by nature; everything else runs on `device`.
            fn, warm = make(images, spec), make(images[:4], spec)
            times = _time(fn, warm, _reps(quick, name, label), "cpu" if name == "pil" else device)
            views = [2 * batch / t for t in times]
            results[label][name] = {
                "reps": views,
                "seconds": times,
                "median": statistics.median(views),
                "device": "cpu" if name == "pil" else device,
            }
        del images
    return results


def _table(res: dict) -> str:
    lines = [f"| method | {' | '.join(res['results'])} |", "| --- |" + " --- |" * len(res["results"])]
    names = list(next(iter(res["results"].values())))
    for n in names:
        cells = [f"{res['results'][lbl][n]['median']:,.0f}" if n in res["results"][lbl] else "-"
                 for lbl in res["results"]]
        lines.append(f"| {n} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 32, 2 repetitions")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default 1: per-core figures)")
    ap.add_argument("--out", help="write the JSON result to this file")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, device=args.device, threads=args.threads)
    print(_table(res))
    print(f"engine ({res['engine_method']}) / reference (pil) at 32 px: {res['ratio']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Images/second delivered to the training loop: the engine's loader + device views against the
reference's DataLoader, the loader against JPEG decoding alone, and what on-the-fly poisoning
costs the loader per attack (what each figure is: docs/benchmarks.md)."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from benchmarks.harness import alternate, comparison, measurement, pin_torch_threads, rate, sync, target

# jpeg_*: ImageNet-size views. photos_*: ImageNet-size loader alone, on more photos, so that a
# repetition takes about 0.4 s (on 128 images, 0.07 s: single repetitions spread 1.06x-1.92x).
FULL = dict(cifar_n=5120, simclr_batch=512, weak_batch=128, view_reps=3, jpeg_n=128, jpeg_batch=32,
            jpeg_poison=True, photos_n=1024, photos_reps=15, photos_epochs=3, attack_n=20_000, attack_batch=512,
            attack_reps=31, attack_epochs=5, warmup=1)
QUICK = dict(cifar_n=256, simclr_batch=64, weak_batch=64, view_reps=1, jpeg_n=32, jpeg_batch=16,
             jpeg_poison=False, photos_n=32, photos_reps=1, photos_epochs=1, attack_n=256, attack_batch=64,
             attack_reps=1, attack_epochs=1, warmup=0)
POISON_RATIO = 0.1
ATTACKS = ("badnets", "blended", "wanet")


def engine_loader(bench, batch: int, workers: int, poison=None, **spec):
    """The engine's training loader over ``bench`` (a BenchSet), at the decode size it was stored at."""
    from engine.data.loaders import LoaderSpec, make_loader
    decode_size = bench.meta["writer"]["decode_size"] or 32  # 0: a raw CIFAR-size set, never decoded
    return make_loader(LoaderSpec(root=str(bench.root), split="train", batch_size=batch, shuffle=True,
                                  drop_last=False, num_workers=workers, decode_size=decode_size, train=True,
                                  **spec), poison=poison)


def engine_epoch(loader, epoch: int, views=None, device=None) -> int:
    """One epoch of the engine loader; with ``views(images, epoch, step)`` also the device views."""
    loader.next_epoch = epoch % 1_000_000  # warm-up rounds pass negative numbers
    n = 0
    for step, (images, _labels, _indices) in enumerate(loader):
        if views is not None:
            views(images.to(device, non_blocking=True), max(epoch, 0), step)
        n += images.shape[0]
    if device is not None:
        sync(device)
    return n


def _view_fns(imagenet: bool):
    """The engine's own SimCLR and weak views of a CIFAR or an ImageNet run, as functions of a uint8 batch."""
    from engine.config import load_config
    from engine.stages.views import WeakAugment, simclr_spec
    from kernels import SimCLRSpec, simclr_views, weak_view
    cfg = load_config(None, ["data.image_size=224", "data.decode_size=256", "data.mean=[0.485,0.456,0.406]",
                             "data.std=[0.229,0.224,0.225]", "linear.view.kind=resized_crop"] if imagenet else [])

    def cut(spec, n_views: int):  # ImageNet's weak view is a colour-free SimCLRSpec: resized crop + flip
        if isinstance(spec, SimCLRSpec):
            return lambda x, epoch, step: simclr_views(x, spec, n_views=n_views, seed=0, epoch=epoch, step=step)
        return lambda x, epoch, step: weak_view(x, spec, seed=0, epoch=epoch, step=step)
    s_spec, w_spec = simclr_spec(cfg.data, cfg.pretrain.views), WeakAugment(cfg.data, cfg.linear.view).spec
    return {"simclr": (cut(s_spec, 2), s_spec), "weak": (cut(w_spec, 1), w_spec)}


def _decode_only(bench, workers: int):
    """JPEG decoding alone: each sample's bytes through FFCV's decoder, numba-parallel over ``workers``."""
    import numba
    from ffcv.libffcv import imdecode
    from numba import njit, prange
    from engine.data.gpu_decode import JpegBeton
    from engine.data.loaders import beton_path
    # Where each sample's JPEG bytes lie: the same reading the GPU-decode loader uses.
    beton = JpegBeton(beton_path(bench.root, "train"))
    ptrs, sizes = beton.ptrs.astype(np.uint64), beton.sizes.astype(np.uint64)
    heights, widths = beton.heights.astype(np.uint32), beton.widths.astype(np.uint32)
    decode_one = njit(nogil=True)(imdecode)

    @njit(parallel=True, nogil=True)
    def decode_batch(data, ptrs, sizes, heights, widths, idx, out):
        for k in prange(len(idx)):
            j = idx[k]
            src = data[ptrs[j]:ptrs[j] + sizes[j]]
            decode_one(src, out[k], heights[j], widths[j], heights[j], widths[j], 0, 0, 1, 1, False, False)

    def epoch(batch: int, seed: int) -> int:  # in batches like the loader's, into one reused buffer
        numba.set_num_threads(workers)
        order = np.random.default_rng(seed).permutation(len(ptrs))
        out = np.empty((batch, int(heights.max()), int(widths.max()), 3), dtype=np.uint8)
        for s in range(0, len(order) - batch + 1, batch):
            decode_batch(beton.data, ptrs, sizes, heights, widths, order[s:s + batch], out)
        return len(order) // batch * batch
    return epoch


def _reference(bench, runtime, transform, views: int, batch: int, workers: int):
    """The reference DataLoader over ``bench``, poisoned as ``runtime``; ``transform`` None: the loader alone."""
    from benchmarks.reference import (IMAGENET_CROP, BadNetsTrigger, InMemoryPoisonDataset, JPEGPoisonDataset,
                                      reference_loader)
    poisoned, tgt = (None, 0) if runtime is None else (np.asarray(runtime.plan.poisoned, bool), runtime.target)
    source, dataset, side = ((bench.jpeg_paths, JPEGPoisonDataset, IMAGENET_CROP) if bench.jpeg_paths
                             else (bench.images, InMemoryPoisonDataset, 32))
    trigger = BadNetsTrigger.white3x3(side, side)
    return reference_loader(dataset(source, bench.labels, poisoned, tgt, trigger, transform, views), batch, workers)


def _views_vs_reference(bench, runtime, view: str, batch: int, s: dict, workers: int, dev) -> dict:
    """The engine loader + device views against the reference DataLoader, alternating."""
    from benchmarks.reference import simclr_transform, weak_transform
    jpeg = bench.jpeg_paths is not None
    (fn, spec), n_views = _view_fns(jpeg)[view], 2 if view == "simclr" else 1
    eng = engine_loader(bench, batch, workers, runtime.train_ops() if runtime else None)
    ref = _reference(bench, runtime, (simclr_transform if view == "simclr" else weak_transform)(spec), n_views,
                     batch, workers)
    r = alternate({"engine": lambda k: rate(lambda: engine_epoch(eng, k, fn, dev)),
                   "reference": lambda k: rate(lambda: sum(b[-1].shape[0] for b in ref))},
                  s["view_reps"], s["warmup"])
    return comparison("images/s", r["engine"], r["reference"], batch=batch, views_per_image=n_views,
                      images=len(bench.labels))


def _epochs(fn, count: int):
    """``count`` epochs of ``fn(epoch) -> images`` a repetition as one rate (one loader epoch is too short)."""
    return lambda r: rate(lambda: sum(fn(r * count + k if r >= 0 else r) for k in range(count if r >= 0 else 1)))


def _loader_alone(bench, runtime, s: dict, workers: int, measurements: dict) -> tuple[float, float, dict]:
    """The engine loader alone against JPEG decoding alone and the reference DataLoader alone (one epoch a
    repetition: it is about 10x slower). Returns the cost over decoding, deliveries/sample, engine / reference."""
    tag, batch = "poisoned" if runtime else "clean", s["jpeg_batch"]
    eng = engine_loader(bench, batch, workers, runtime.train_ops() if runtime else None)
    decode, ref = _decode_only(bench, workers), _reference(bench, runtime, None, 1, batch, workers)
    r = alternate({"loader": _epochs(lambda e: engine_epoch(eng, e), s["photos_epochs"]),
                   "decode": _epochs(lambda e: decode(batch, e % 1_000_000 + 10), s["photos_epochs"]),
                   "reference": _epochs(lambda e: sum(b[-1].shape[0] for b in ref), 1)},
                  s["photos_reps"], s["warmup"], seed=0)
    # Loader seconds per image over decode seconds per image: the ratio of the medians, as
    # comparison() gives it, with each round's ratio kept.
    cost = statistics.median(r["decode"]) / statistics.median(r["loader"])
    measurements[f"imagenet224/loader_only/engine/{tag}"] = measurement("images/s", r["loader"])
    measurements["imagenet224/decode_only"] = measurement("images/s", r["decode"])
    measurements["imagenet224/loader_cost_over_decode"] = {
        "unit": "x", "median": cost, "reps": [d / x for x, d in zip(r["loader"], r["decode"])], "loader": tag}
    eng.next_epoch = 99  # once per epoch means one decode serves both views
    seen = np.concatenate([idx.numpy().copy() for _, _, idx in eng])
    per_sample = len(seen) / len(np.unique(seen))
    measurements["imagenet224/deliveries_per_sample"] = measurement("deliveries/sample/epoch", [per_sample])
    return cost, per_sample, comparison("images/s", r["loader"], r["reference"], batch=batch, images=len(bench.labels))


def trigger_by_attack(bench, *, batch: int, threads: int, reps: int, epochs: int, on_device: bool = False,
                      **spec) -> dict:
    """The engine loader with each attack's operations against the clean loader over ``bench``, the sides in a
    fresh seeded order every repetition. ``on_device``: also each attack with data.trigger_device=device, and
    its device twin's CPU time per image. ``spec``: more LoaderSpec fields (``indices``, ``os_cache``)."""
    from benchmarks.synthetic import poison_runtime
    from engine.data.device_trigger import LabelOnlyOps
    loaders, twin_us = {"clean": engine_loader(bench, batch, threads, **spec)}, {}
    for name in ATTACKS:
        runtime = poison_runtime(bench, attack=name, ratio=POISON_RATIO, num_workers=threads)[0]
        loaders[name] = engine_loader(bench, batch, threads, runtime.train_ops(), **spec)
        if on_device:  # the CPU loader keeps only the label changes; the device draws the trigger after it
            loaders[f"{name}@device"] = engine_loader(bench, batch, threads, LabelOnlyOps(runtime.train_ops()), **spec)
            twin_us[f"{name}@device"] = _twin_us_per_triggered_image(runtime, 32 if bench.images is not None else 256)
    # A warm-up epoch each (compilation, first touch of the file, trigger memos).
    rates = alternate({k: _epochs(lambda e, x=x: engine_epoch(x, e), epochs) for k, x in loaders.items()}, reps, seed=0)
    # Each repetition times the sides back to back, so a ratio within a repetition shares that
    # moment's machine load: its median is the steadier estimate on a shared machine.
    paired = {k: statistics.median(x / c for x, c in zip(rates[k], rates["clean"])) for k in rates if k != "clean"}
    return {"results": rates, "overhead": {k: 1.0 / v - 1.0 for k, v in paired.items()},
            "twin_cpu_us_per_triggered_image": twin_us, "batch_size": batch, "threads": threads}


def _twin_us_per_triggered_image(runtime, side: int, batch: int = 32) -> float:
    """The device twin's time per triggered image on this CPU (one thread, median of 5; GPU: benchmarks gpu)."""
    from engine.attacks.device import DevicePoison
    poison = DevicePoison.of(runtime, "train")
    selected = np.flatnonzero(poison.selected)[:batch]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (len(selected), side, side, 3), np.uint8))
    positions = torch.from_numpy(selected.astype(np.int64))
    poison.apply(images.clone(), positions)  # tables built once
    per_s = [rate(lambda x=images.clone(): (poison.apply(x, positions), len(selected))[1]) for _ in range(5)]
    return 1e6 / statistics.median(per_s)


def run(quick: bool = False, device: str | None = None, workers: int | None = None,
        threads: int | None = None) -> dict:
    """``workers``: FFCV loader threads = DataLoader worker processes (default: the cores; 1 in quick
    mode, robust on a busy machine). ``threads``: torch intra-op threads of the engine's views."""
    from benchmarks.synthetic import cifar_like, imagenet_like, poison_runtime
    s, t_start = QUICK if quick else FULL, time.perf_counter()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    workers = workers or (1 if quick else min(os.cpu_count() or 1, 16))
    pin_torch_threads(threads)
    # Quick mode reads the JPEGs unpoisoned: the triggering JPEG decoder takes numba several
    # seconds to compile, too long for a smoke run.
    tag = "poisoned" if s["jpeg_poison"] else "clean"
    cifar, photos, big = cifar_like(s["cifar_n"]), imagenet_like(s["jpeg_n"]), imagenet_like(s["photos_n"])
    runtime, runtime_j, runtime_big = (poison_runtime(b, ratio=POISON_RATIO, num_workers=workers)[0]
                                       if b is cifar or s["jpeg_poison"] else None for b in (cifar, photos, big))
    comparisons, measurements = {}, {}
    for size, bench, rt, batches in (("cifar32", cifar, runtime, (s["simclr_batch"], s["weak_batch"])),
                                     ("imagenet224", photos, runtime_j, (s["jpeg_batch"], s["jpeg_batch"]))):
        for view, batch in zip(("simclr", "weak"), batches):
            comparisons[f"{size}/{view}/{'poisoned' if rt else 'clean'}"] = _views_vs_reference(
                bench, rt, view, batch, s, workers, dev)
    cost, per_sample, comparisons[f"imagenet224/loader_only/{tag}"] = _loader_alone(
        big, runtime_big, s, workers, measurements)
    threads_a = max(1, min(workers, 8))
    by_attack = {"cifar32": trigger_by_attack(cifar_like(s["attack_n"]), batch=s["attack_batch"], threads=threads_a,
                                              reps=s["attack_reps"], epochs=s["attack_epochs"])}
    if s["jpeg_poison"]:  # quick mode: the triggering JPEG decoders take too long to compile
        by_attack["imagenet224"] = trigger_by_attack(big, batch=s["jpeg_batch"], threads=threads_a,
                                                     reps=s["photos_reps"], epochs=s["photos_epochs"], on_device=True)
    for size, rec in by_attack.items():
        for name, reps in rec["results"].items():
            measurements[f"trigger/{size}/{name}/loader_only"] = measurement(
                "images/s", reps, twin_cpu_us_per_triggered_image=rec["twin_cpu_us_per_triggered_image"].get(name))
    head = comparisons["cifar32/simclr/poisoned"]
    targets = [target("loader, CIFAR-size, SimCLR two views, CPU: engine / reference", head["ratio"], ">=", 20.0,
                      "" if dev.type == "cpu" else f"measured on {dev.type}; the target is stated for CPU"),
               target(f"ImageNet-size: engine loader ({tag}) cost / JPEG decode cost", cost, "<=", 1.3),
               target("ImageNet-size: JPEG decodes (deliveries) per sample per epoch", per_sample, "<=", 1.0),
               target(f"ImageNet-size: engine loader / reference DataLoader, loader alone, {tag}",
                      comparisons[f"imagenet224/loader_only/{tag}"]["ratio"], ">=", 4.0)]
    # name@device: data.trigger_device=device, the CPU loader's share (the twin's time: its measurement).
    targets += [target(f"trigger overhead, engine loader, {size}, {name}", overhead, "<=", 0.05)
                for size, rec in by_attack.items() for name, overhead in rec["overhead"].items()]
    return {"unit": "images/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
            "headline": "cifar32/simclr/poisoned", "comparisons": comparisons, "measurements": measurements,
            "trigger_by_attack": by_attack, "targets": targets, "seconds": time.perf_counter() - t_start,
            "settings": {**s, "quick": quick, "workers": workers, "engine_views_device": str(dev),
                         "poison": f"badnets white3x3, {POISON_RATIO:.0%} of the training set",
                         "torch_threads": torch.get_num_threads(), "torch_threads_pinned": threads is not None},
            "notes": ["what each figure is: docs/benchmarks.md"] + (
                ["quick mode: ImageNet-size figures unpoisoned, no per-attack ones"] if quick else [])}

"""Images/second delivered to the training loop: the engine's loader against the reference's.

"Delivered" means normalised float views ready for the model. The engine: its FFCV
loader (raw uint8 images, trigger applied while loading) and then ``kernels`` cutting
the views on the device (the CPU here, through the PyTorch path). The reference: a
PyTorch Dataset that triggers and augments each sample with PIL, batched by a
DataLoader with as many worker processes as the engine has loader threads
(benchmarks/reference). Both read the same images and poison the same samples
(BadNets, 10 % of the training set).

Measured, each side alternating with the other after a warm-up epoch:

- views: SimCLR's two views and the weak view, CIFAR-size raw and ImageNet-size JPEG,
  poisoned (engine vs reference);
- trigger overhead: the loader alone (uint8 images, no views) with and without
  poisoning, for each side and size;
- ImageNet-size: the engine loader against JPEG decoding alone (the same bytes, the
  same decoder and thread count, nothing else), and a count of how often each sample
  is delivered per epoch (once: one decode serves both views);
- full mode: benchmarks/loader.py, the engine loader with each attack (BadNets,
  Blended, WaNet with noise) against the clean loader, kept under ``trigger_by_attack``.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from benchmarks.measure import alternate, comparison, measurement, pin_torch_threads, rate, target

FULL = dict(cifar_n=5120, simclr_batch=512, weak_batch=128, jpeg_n=128, jpeg_batch=32, reps=3, loader_reps=5,
            jpeg_reps=3, loader_epochs=20, reference_loader_epochs=2, jpeg_loader_epochs=4, jpeg_poison=True,
            warmup=1)
QUICK = dict(cifar_n=256, simclr_batch=64, weak_batch=64, jpeg_n=32, jpeg_batch=16, reps=1, loader_reps=1,
             jpeg_reps=1, loader_epochs=2, reference_loader_epochs=1, jpeg_loader_epochs=1, jpeg_poison=False,
             warmup=0)
POISON_RATIO = 0.1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _engine_loader(bench, batch: int, workers: int, decode_size: int, poison):
    from engine.data.loaders import LoaderSpec, make_loader

    return make_loader(LoaderSpec(root=str(bench.root), split="train", batch_size=batch, shuffle=True, drop_last=True,
                                  num_workers=workers, decode_size=decode_size, train=True),
                       poison=poison)


def _engine_epoch(loader, epoch: int, views=None, device: torch.device | None = None) -> int:
    """One epoch of the engine loader; with ``views(images, step)`` also the device views."""
    loader.next_epoch = epoch % 1_000_000  # warm-up rounds pass negative numbers
    n = 0
    for step, (images, _labels, _indices) in enumerate(loader):
        if views is not None:
            images = images.to(device, non_blocking=True)
            out = views(images, epoch, step)
            del out
        n += images.shape[0]
    if device is not None:
        _sync(device)
    return n


def _reference_epoch(loader, epochs: int = 1) -> int:
    n = 0
    for _ in range(epochs):
        for batch in loader:
            n += batch[-1].shape[0]
    return n


def _view_fns(simclr_spec, weak_spec):
    from kernels import SimCLRSpec, simclr_views, weak_view

    def simclr(images, epoch, step):
        views, _ = simclr_views(images, simclr_spec, seed=0, epoch=max(epoch, 0), step=step)
        return views

    def weak(images, epoch, step):
        if isinstance(weak_spec, SimCLRSpec):  # ImageNet's resized crop + flip, colour ops off
            views, _ = simclr_views(images, weak_spec, n_views=1, seed=0, epoch=max(epoch, 0), step=step)
            return views[0]
        out, _ = weak_view(images, weak_spec, seed=0, epoch=max(epoch, 0), step=step)
        return out

    return simclr, weak


def _specs(image_size: int, imagenet: bool):
    """The engine's own view specs for a CIFAR or an ImageNet run (its preset settings)."""
    from engine.config import load_config
    from engine.stages.views import WeakAugment, simclr_spec

    over = [f"data.image_size={image_size}"]
    if imagenet:
        over += ["data.decode_size=256", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
                 "pretrain.views.blur_kernel_size=23", "linear.view.kind=resized_crop"]
    cfg = load_config(None, over)
    return simclr_spec(cfg, cfg.pretrain.views), WeakAugment(cfg, cfg.linear.view).spec


def _decode_only(bench, workers: int):
    """JPEG decoding alone: every sample's bytes through FFCV's decoder into a buffer,
    numba-parallel over ``workers`` threads, in batches like the loader's."""
    import numba
    from ffcv.libffcv import imdecode
    from numba import njit, prange

    from engine.data.beton import open_beton
    from engine.data.loaders import beton_path

    reader = open_beton(beton_path(bench.root, "train"))
    meta = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
    table = reader.alloc_table
    order = np.argsort(table["ptr"])
    sorted_ptrs, sorted_sizes = table["ptr"][order], table["size"][order]
    ptrs = np.ascontiguousarray(meta["data_ptr"], dtype=np.uint64)
    sizes = sorted_sizes[np.searchsorted(sorted_ptrs, ptrs)].astype(np.uint64)
    heights = np.ascontiguousarray(meta["height"], dtype=np.uint32)
    widths = np.ascontiguousarray(meta["width"], dtype=np.uint32)
    data = np.memmap(reader.file_name, dtype=np.uint8, mode="r")
    decode_one = njit(nogil=True)(imdecode)

    @njit(parallel=True, nogil=True)
    def decode_batch(data, ptrs, sizes, heights, widths, idx, out):
        for k in prange(len(idx)):
            j = idx[k]
            src = data[ptrs[j]:ptrs[j] + sizes[j]]
            decode_one(src, out[k], heights[j], widths[j], heights[j], widths[j], 0, 0, 1, 1, False, False)

    def epoch(batch: int, seed: int) -> int:
        numba.set_num_threads(workers)
        idx_all = np.random.default_rng(seed).permutation(len(ptrs))
        out = np.empty((batch, int(heights.max()), int(widths.max()), 3), dtype=np.uint8)
        n = 0
        for s in range(0, len(idx_all) - batch + 1, batch):
            decode_batch(data, ptrs, sizes, heights, widths, idx_all[s:s + batch], out)
            n += batch
        return n

    return epoch


def _trigger_by_attack() -> dict:
    """benchmarks/loader.py: the engine loader with each attack against the clean loader."""
    import inspect

    from benchmarks import loader as trigger_module

    params = inspect.signature(trigger_module.run).parameters
    return trigger_module.run(**({"quick": False} if "quick" in params else {}))


def _poisoned_reference(bench, runtime, transform, views: int, jpeg: bool):
    from benchmarks.reference import BadNetsTrigger, InMemoryPoisonDataset, JPEGPoisonDataset

    poisoned = None if runtime is None else np.asarray(runtime.plan.poisoned, dtype=bool)
    target = 0 if runtime is None else runtime.target
    if jpeg:
        from benchmarks.reference.pipeline import IMAGENET_CROP

        trigger = BadNetsTrigger.white3x3(IMAGENET_CROP, IMAGENET_CROP)
        return JPEGPoisonDataset(bench.jpeg_paths, bench.labels, poisoned, target, trigger, transform, views)
    trigger = BadNetsTrigger.white3x3(32, 32)
    return InMemoryPoisonDataset(bench.images, bench.labels, poisoned, target, trigger, transform, views)


def run(quick: bool = False, device: str | None = None, workers: int | None = None,
        threads: int | None = None) -> dict:
    """``workers``: FFCV loader threads = DataLoader worker processes (default: the cores;
    1 in quick mode). ``threads``: torch intra-op threads of the engine's views (default:
    what the engine does, FFCV's setting = ``workers``)."""
    from benchmarks.reference import reference_loader, simclr_transform, weak_transform
    from benchmarks.synthetic import cifar_like, imagenet_like, poison_runtime

    s = QUICK if quick else FULL
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Quick: one loader thread and one DataLoader worker, robust on a busy machine.
    workers = workers or (1 if quick else min(os.cpu_count() or 1, 16))
    pin_torch_threads(threads)
    comparisons: dict = {}
    measurements: dict = {}
    notes: list[str] = []
    t_start = time.perf_counter()

    # ------------------------------------------------------------ CIFAR-size, raw
    cifar = cifar_like(s["cifar_n"])
    runtime, _ = poison_runtime(cifar, image_size=32, decode_size=0, ratio=POISON_RATIO, num_workers=workers)
    simclr_spec, weak_spec = _specs(32, imagenet=False)
    simclr, weak = _view_fns(simclr_spec, weak_spec)
    # One engine loader per batch size, reused: FFCV compiles each loader on its first epoch.
    eng = {b: _engine_loader(cifar, b, workers, 32, runtime.train_ops())
           for b in sorted({s["simclr_batch"], s["weak_batch"]})}
    for view, batch, fn, spec, n_views, tf in (
            ("simclr", s["simclr_batch"], simclr, simclr_spec, 2, simclr_transform),
            ("weak", s["weak_batch"], weak, weak_spec, 1, weak_transform)):
        ref = reference_loader(_poisoned_reference(cifar, runtime, tf(spec), n_views, jpeg=False), batch, workers)
        reps = alternate({"engine": lambda r, e=eng[batch], fn=fn: rate(lambda: _engine_epoch(e, r, fn, dev)),
                          "reference": lambda r, ref=ref: rate(lambda: _reference_epoch(ref))},
                         s["reps"], s["warmup"])
        comparisons[f"cifar32/{view}/poisoned"] = comparison(
            "images/s", reps["engine"], reps["reference"], batch=batch, images=s["cifar_n"], views_per_image=n_views)
        del ref

    # Trigger overhead, loader alone: many epochs per repetition since the engine's raw
    # loader runs at hundreds of thousands of images per second.
    eng_clean = _engine_loader(cifar, s["weak_batch"], workers, 32, None)
    eng_pois = eng[s["weak_batch"]]
    ref_clean = reference_loader(_poisoned_reference(cifar, None, None, 1, jpeg=False), s["weak_batch"], workers)
    ref_pois = reference_loader(_poisoned_reference(cifar, runtime, None, 1, jpeg=False), s["weak_batch"], workers)
    e_ep, r_ep = s["loader_epochs"], s["reference_loader_epochs"]

    def engine_epochs(loader, r):
        return lambda: sum(_engine_epoch(loader, r * e_ep + k if r >= 0 else r) for k in range(e_ep))

    reps = alternate({"engine_clean": lambda r: rate(engine_epochs(eng_clean, r)),
                      "engine_poisoned": lambda r: rate(engine_epochs(eng_pois, r)),
                      "reference_clean": lambda r: rate(lambda: _reference_epoch(ref_clean, r_ep)),
                      "reference_poisoned": lambda r: rate(lambda: _reference_epoch(ref_pois, r_ep))},
                     s["loader_reps"], s["warmup"])
    overhead = {}
    for side in ("engine", "reference"):
        m = comparison("images/s", reps[f"{side}_poisoned"], reps[f"{side}_clean"])
        # Overhead = clean rate / poisoned rate - 1 (the extra time per image).
        overhead[side] = 1.0 / m["ratio"] - 1.0
        measurements[f"cifar32/loader_only/{side}/clean"] = measurement("images/s", reps[f"{side}_clean"])
        measurements[f"cifar32/loader_only/{side}/poisoned"] = measurement(
            "images/s", reps[f"{side}_poisoned"], trigger_overhead=overhead[side])
    comparisons["cifar32/loader_only/poisoned"] = comparison(
        "images/s", reps["engine_poisoned"], reps["reference_poisoned"], batch=s["weak_batch"])
    del eng, eng_clean, eng_pois, ref_clean, ref_pois

    # ------------------------------------------------------------ ImageNet-size, JPEG
    jpeg = imagenet_like(s["jpeg_n"])
    runtime_j, _ = poison_runtime(jpeg, image_size=224, decode_size=256, ratio=POISON_RATIO, num_workers=workers)
    # Quick mode reads the JPEGs unpoisoned: the triggering JPEG decoder takes numba
    # several seconds to compile, too long for a smoke run.
    tag = "poisoned" if s["jpeg_poison"] else "clean"
    rt_j = runtime_j if s["jpeg_poison"] else None
    simclr_spec_j, weak_spec_j = _specs(224, imagenet=True)
    simclr_j, weak_j = _view_fns(simclr_spec_j, weak_spec_j)
    eng_j = _engine_loader(jpeg, s["jpeg_batch"], workers, 256, rt_j.train_ops() if rt_j else None)
    for view, fn, spec, n_views, tf in (("simclr", simclr_j, simclr_spec_j, 2, simclr_transform),
                                        ("weak", weak_j, weak_spec_j, 1, weak_transform)):
        ref = reference_loader(_poisoned_reference(jpeg, rt_j, tf(spec), n_views, jpeg=True), s["jpeg_batch"],
                               workers)
        reps = alternate({"engine": lambda r, fn=fn: rate(lambda: _engine_epoch(eng_j, r, fn, dev)),
                          "reference": lambda r, ref=ref: rate(lambda: _reference_epoch(ref))},
                         s["jpeg_reps"], s["warmup"])
        comparisons[f"imagenet224/{view}/{tag}"] = comparison(
            "images/s", reps["engine"], reps["reference"], batch=s["jpeg_batch"], images=s["jpeg_n"],
            views_per_image=n_views)
        del ref

    # The engine loader (decode + trigger + crop/resize + batching) against decoding alone.
    decode = _decode_only(jpeg, workers)
    j_ep = s["jpeg_loader_epochs"]

    def jpeg_epochs(fn):
        # Several epochs per repetition: one epoch of the loader alone is too short to time well.
        return lambda r: rate(lambda: sum(fn(r * j_ep + k if r >= 0 else r) for k in range(j_ep)))

    reps = alternate({"loader": jpeg_epochs(lambda e: _engine_epoch(eng_j, e)),
                      "decode": jpeg_epochs(lambda e: decode(s["jpeg_batch"], e % 1_000_000 + 10))},
                     s["loader_reps"], s["warmup"])
    m = comparison("images/s", reps["loader"], reps["decode"])
    loader_cost = 1.0 / m["ratio"]  # loader seconds per image over decode seconds per image
    measurements[f"imagenet224/loader_only/engine/{tag}"] = measurement("images/s", reps["loader"])
    measurements["imagenet224/decode_only"] = measurement("images/s", reps["decode"])
    measurements["imagenet224/loader_cost_over_decode"] = {"unit": "x", "median": loader_cost,
                                                          "reps": [1.0 / x for x in m["round_ratios"]],
                                                          "loader": tag}
    # Each sample is delivered once per epoch (so decoded once), both views come from it.
    eng_j.next_epoch = 99
    seen = np.concatenate([idx.numpy().copy() for _, _, idx in eng_j])
    measurements["imagenet224/deliveries_per_sample"] = {
        "unit": "deliveries/sample/epoch", "median": len(seen) / len(np.unique(seen)),
        "reps": [len(seen) / len(np.unique(seen))], "delivered": int(len(seen)), "unique": int(len(np.unique(seen)))}

    if s["jpeg_poison"]:
        eng_jc = _engine_loader(jpeg, s["jpeg_batch"], workers, 256, None)
        ref_jc = reference_loader(_poisoned_reference(jpeg, None, None, 1, jpeg=True), s["jpeg_batch"], workers)
        ref_jp = reference_loader(_poisoned_reference(jpeg, runtime_j, None, 1, jpeg=True), s["jpeg_batch"], workers)
        reps = alternate({"engine_clean": jpeg_epochs(lambda e: _engine_epoch(eng_jc, e)),
                          "engine_poisoned": jpeg_epochs(lambda e: _engine_epoch(eng_j, e)),
                          "reference_clean": lambda r: rate(lambda: _reference_epoch(ref_jc)),
                          "reference_poisoned": lambda r: rate(lambda: _reference_epoch(ref_jp))},
                         s["loader_reps"], s["warmup"])
        for side in ("engine", "reference"):
            m = comparison("images/s", reps[f"{side}_poisoned"], reps[f"{side}_clean"])
            overhead[f"{side}_jpeg"] = 1.0 / m["ratio"] - 1.0
            measurements[f"imagenet224/loader_only/{side}/clean"] = measurement("images/s", reps[f"{side}_clean"])
            measurements[f"imagenet224/loader_only/{side}/poisoned_overhead_run"] = measurement(
                "images/s", reps[f"{side}_poisoned"], trigger_overhead=overhead[f"{side}_jpeg"])
        comparisons["imagenet224/loader_only/poisoned"] = comparison(
            "images/s", reps["engine_poisoned"], reps["reference_poisoned"], batch=s["jpeg_batch"])
        del eng_jc, ref_jc, ref_jp
    else:
        notes.append("quick mode: ImageNet-size figures are unpoisoned, and its trigger overhead is measured in "
                     "full mode only")

    by_attack = None
    if quick:
        notes.append("quick mode: the per-attack trigger overhead (benchmarks/loader.py) runs in full mode only")
    else:
        by_attack = _trigger_by_attack()
        for name, reps_a in by_attack.get("results", {}).items():
            measurements[f"trigger/{name}/loader_only"] = measurement("images/s", reps_a)
        for name, r in by_attack.get("ratio_per_attack", {}).items():
            overhead[f"engine_{name}"] = 1.0 / r - 1.0

    # The trigger's share of the time per image the training loop actually waits for:
    # extra loader seconds per image (poisoned - clean) over seconds per delivered image
    # (loader + SimCLR views). The bare loader's overhead above exaggerates it, since a
    # raw loader alone runs far faster than anything that consumes it.
    cost = {}
    for size, key in (("cifar32", "cifar32/simclr/poisoned"), ("imagenet224", "imagenet224/simclr/poisoned")):
        clean = measurements.get(f"{size}/loader_only/engine/clean")
        # The ImageNet-size poisoned loader has a run alternated with its clean twin: prefer it.
        pois = measurements.get(f"{size}/loader_only/engine/poisoned_overhead_run") or measurements.get(
            f"{size}/loader_only/engine/poisoned")
        if clean and pois and key in comparisons:
            cost[size] = (1.0 / pois["median"] - 1.0 / clean["median"]) * comparisons[key]["engine"]
    head = comparisons["cifar32/simclr/poisoned"]
    targets = [
        target("loader, CIFAR-size, SimCLR two views, CPU: engine / reference", head["ratio"], ">=", 20.0,
               "" if dev.type == "cpu" else f"measured on {dev.type}; the target is stated for CPU"),
        target("trigger overhead, engine loader, CIFAR-size", overhead["engine"], "<=", 0.05),
        target(f"ImageNet-size: engine loader ({tag}) cost / JPEG decode cost", loader_cost, "<=", 1.3),
        target("ImageNet-size: JPEG decodes (deliveries) per sample per epoch",
               measurements["imagenet224/deliveries_per_sample"]["median"], "<=", 1.0),
    ]
    if "engine_jpeg" in overhead:
        targets.append(target("trigger overhead, engine loader, ImageNet-size", overhead["engine_jpeg"], "<=", 0.05))
    for size, share in cost.items():
        targets.append(target(f"trigger share of the delivered time per image (loader + SimCLR views), {size}",
                              share, "<=", 0.05))
    for name in (by_attack or {}).get("ratio_per_attack", {}):
        targets.append(target(f"trigger overhead, engine loader, CIFAR-size, {name} (benchmarks/loader.py)",
                              overhead[f"engine_{name}"], "<=", 0.05))
    return {
        "unit": "images/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
        "headline": "cifar32/simclr/poisoned",
        "settings": {**s, "quick": quick, "workers": workers, "engine_views_device": str(dev),
                     "poison": f"badnets white3x3, {POISON_RATIO:.0%} of the training set",
                     "torch_threads": torch.get_num_threads(),
                     "torch_threads_pinned": threads is not None,
                     "engine": "FFCV loader (uint8, trigger while loading) + kernels views on the device",
                     "reference": "Dataset (NumPy trigger, PIL transforms per sample) + DataLoader workers",
                     "delivered": "normalised float views ready for the model"},
        "comparisons": comparisons, "measurements": measurements, "trigger_overhead": overhead,
        "trigger_by_attack": by_attack, "trigger_share_of_delivered_time": cost,
        "targets": targets, "notes": notes, "seconds": time.perf_counter() - t_start,
    }

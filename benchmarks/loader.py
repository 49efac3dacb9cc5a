"""Images/second delivered to the training loop: the engine's loader + device views
against the reference's DataLoader, the loader against JPEG decoding alone, and what
on-the-fly poisoning costs the loader per attack (what each figure is: docs/benchmarks.md)."""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch

from benchmarks.harness import alternate, comparison, measurement, pin_torch_threads, rate, sync, target

FULL = dict(cifar_n=5120, simclr_batch=512, weak_batch=128, jpeg_n=128, jpeg_batch=32, reps=3, loader_reps=5,
            jpeg_reps=3, loader_epochs=20, reference_loader_epochs=2, jpeg_loader_epochs=4, jpeg_poison=True,
            warmup=1, attack_n=20_000, attack_batch=512, attack_reps=31, attack_epochs=5, jpeg_attack_n=1024,
            jpeg_attack_reps=15, jpeg_attack_epochs=3, jpeg_cost_n=1024, jpeg_cost_reps=15, jpeg_cost_epochs=3)
QUICK = dict(cifar_n=256, simclr_batch=64, weak_batch=64, jpeg_n=32, jpeg_batch=16, reps=1, loader_reps=1,
             jpeg_reps=1, loader_epochs=2, reference_loader_epochs=1, jpeg_loader_epochs=1, jpeg_poison=False,
             warmup=0, attack_n=256, attack_batch=64, attack_reps=1, attack_epochs=1, jpeg_attack_n=32,
            jpeg_attack_reps=1, jpeg_attack_epochs=1, jpeg_cost_n=32, jpeg_cost_reps=1, jpeg_cost_epochs=1)
POISON_RATIO = 0.1
ATTACKS = ("badnets", "blended", "wanet")


def engine_loader(bench, batch: int, workers: int, decode_size: int, poison=None, drop_last: bool = True, **spec):
    """The engine's training loader over ``bench`` (a BenchSet or a prepared folder)."""
    from engine.data.loaders import LoaderSpec, make_loader
    root = bench if isinstance(bench, (str, os.PathLike)) else bench.root  # a Path has a .root ("/") too
    return make_loader(LoaderSpec(root=str(root), split="train", batch_size=batch,
                                  shuffle=True, drop_last=drop_last, num_workers=workers, decode_size=decode_size,
                                  train=True, **spec), poison=poison)


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


def _view_fns(image_size: int, imagenet: bool):
    """The engine's own SimCLR and weak views for a CIFAR or an ImageNet run (its preset
    settings), as functions of a uint8 batch; and their specs."""
    from engine.config import load_config
    from engine.stages.views import WeakAugment, simclr_spec
    from kernels import SimCLRSpec, simclr_views, weak_view
    over = [f"data.image_size={image_size}"]
    if imagenet:
        over += ["data.decode_size=256", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
                 "linear.view.kind=resized_crop"]
    cfg = load_config(None, over)
    s_spec, w_spec = simclr_spec(cfg.data, cfg.pretrain.views), WeakAugment(cfg.data, cfg.linear.view).spec

    def simclr(images, epoch, step):
        return simclr_views(images, s_spec, seed=0, epoch=epoch, step=step)[0]

    def weak(images, epoch, step):
        if isinstance(w_spec, SimCLRSpec):  # ImageNet's resized crop + flip, colour ops off
            return simclr_views(images, w_spec, n_views=1, seed=0, epoch=epoch, step=step)[0][0]
        return weak_view(images, w_spec, seed=0, epoch=epoch, step=step)[0]
    return (simclr, s_spec), (weak, w_spec)


def _decode_only(bench, workers: int):
    """JPEG decoding alone: every sample's bytes through FFCV's decoder into a buffer,
    numba-parallel over ``workers`` threads, in batches like the loader's."""
    import numba
    from ffcv.libffcv import imdecode
    from numba import njit, prange
    from engine.data.gpu_decode import JpegBeton
    from engine.data.loaders import beton_path
    # Where each sample's JPEG bytes lie: the same reading the GPU-decode loader uses.
    beton = JpegBeton(beton_path(bench.root, "train"))
    ptrs, sizes = beton.ptrs.astype(np.uint64), beton.sizes.astype(np.uint64)
    heights, widths = beton.heights.astype(np.uint32), beton.widths.astype(np.uint32)
    data = beton.data
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
        for s in range(0, len(idx_all) - batch + 1, batch):
            decode_batch(data, ptrs, sizes, heights, widths, idx_all[s:s + batch], out)
        return len(idx_all) // batch * batch
    return epoch


def _reference(bench, runtime, transform, views: int, batch: int, workers: int):
    """The reference DataLoader over ``bench``, poisoned as ``runtime`` (None: clean)."""
    from benchmarks.reference import BadNetsTrigger, InMemoryPoisonDataset, JPEGPoisonDataset, reference_loader
    from benchmarks.reference.pipeline import IMAGENET_CROP
    poisoned = None if runtime is None else np.asarray(runtime.plan.poisoned, dtype=bool)
    tgt = 0 if runtime is None else runtime.target
    if bench.jpeg_paths:
        ds = JPEGPoisonDataset(bench.jpeg_paths, bench.labels, poisoned, tgt,
                               BadNetsTrigger.white3x3(IMAGENET_CROP, IMAGENET_CROP), transform, views)
    else:
        ds = InMemoryPoisonDataset(bench.images, bench.labels, poisoned, tgt, BadNetsTrigger.white3x3(32, 32),
                                   transform, views)
    return reference_loader(ds, batch, workers)


def _views_vs_reference(bench, runtime, loader, view: str, fn_spec, batch: int, workers: int, reps: int,
                        warmup: int, dev, **extra) -> dict:
    """The engine loader + device views against the reference DataLoader, alternating."""
    from benchmarks.reference import simclr_transform, weak_transform
    (fn, spec), n_views = fn_spec, 2 if view == "simclr" else 1
    ref = _reference(bench, runtime, (simclr_transform if view == "simclr" else weak_transform)(spec), n_views,
                     batch, workers)
    r = alternate({"engine": lambda k: rate(lambda: engine_epoch(loader, k, fn, dev)),
                   "reference": lambda k: rate(lambda: sum(b[-1].shape[0] for b in ref))}, reps, warmup)
    return comparison("images/s", r["engine"], r["reference"], batch=batch, views_per_image=n_views, **extra)


def _epochs(fn, count: int):
    """``count`` epochs of ``fn(epoch) -> images`` per repetition (one per warm-up round), as
    a rate: one epoch of a loader alone is too short to time well."""
    return lambda r: rate(lambda: sum(fn(r * count + k if r >= 0 else r) for k in range(count if r >= 0 else 1)))


def _overhead(bench, runtime, eng_pois, batch: int, workers: int, epochs: tuple[int, int], s: dict, size: str,
              measurements: dict, reps: int, tag: str = "poisoned"):
    """The loader alone, clean and poisoned (``eng_pois``; ``runtime``'s poisoning), engine
    and reference, all alternated; ``epochs``: per repetition for (engine, reference).
    Returns each side's overhead (clean rate / poisoned rate - 1) and engine vs reference
    poisoned."""
    engines = (engine_loader(bench, batch, workers, 256 if bench.jpeg_paths else 32), eng_pois)
    refs = [_reference(bench, rt, None, 1, batch, workers) for rt in (None, runtime)]
    sides = {"engine": [_epochs(lambda e, x=x: engine_epoch(x, e), epochs[0]) for x in engines],
             "reference": [_epochs(lambda e, x=x: sum(b[-1].shape[0] for b in x), epochs[1]) for x in refs]}
    r = alternate({f"{side}_{kind}": fn for side, fns in sides.items() for kind, fn in zip(("clean", "poisoned"), fns)},
                  reps, s["warmup"])
    overhead = {}
    for side in sides:
        overhead[side] = 1.0 / comparison("images/s", r[f"{side}_poisoned"], r[f"{side}_clean"])["ratio"] - 1.0
        measurements[f"{size}/loader_only/{side}/clean"] = measurement("images/s", r[f"{side}_clean"])
        measurements[f"{size}/loader_only/{side}/{tag}"] = measurement(
            "images/s", r[f"{side}_poisoned"], trigger_overhead=overhead[side])
    return overhead, {**comparison("images/s", r["engine_poisoned"], r["reference_poisoned"]), "batch": batch}


def _loader_vs_decode(bench, s: dict, workers: int, tag: str, prefix: str, epochs: int, reps: int,
                      measurements: dict, **more) -> tuple[dict, float]:
    """The engine loader over ``bench`` against JPEG decoding alone (and ``more`` sides),
    alternating; records both and the loader's cost over decoding's. Returns the rates
    and that cost (loader seconds per image over decode seconds per image)."""
    from benchmarks.synthetic import poison_runtime
    rt = poison_runtime(bench, image_size=224, decode_size=256, ratio=POISON_RATIO,
                        num_workers=workers)[0] if s["jpeg_poison"] else None
    eng = engine_loader(bench, s["jpeg_batch"], workers, 256, rt.train_ops() if rt else None)
    decode = _decode_only(bench, workers)
    sides = {"loader": lambda e: engine_epoch(eng, e), "decode": lambda e: decode(s["jpeg_batch"], e % 1_000_000 + 10),
             **more}
    r = alternate({k: _epochs(fn, epochs) for k, fn in sides.items()}, reps, s["warmup"])
    m = comparison("images/s", r["loader"], r["decode"])
    measurements[f"imagenet224/{prefix}loader_only/engine/{tag}"] = measurement("images/s", r["loader"])
    measurements[f"imagenet224/{prefix}decode_only"] = measurement("images/s", r["decode"])
    measurements[f"imagenet224/{prefix}loader_cost_over_decode"] = {
        "unit": "x", "median": 1.0 / m["ratio"], "reps": [1.0 / x for x in m["round_ratios"]], "loader": tag}
    return r, 1.0 / m["ratio"]


def trigger_by_attack(s: dict, workers: int, jpeg: bool = False) -> dict:
    """The engine loader with each attack's operations against the clean loader: on the
    raw CIFAR-size set, or (``jpeg``) on the ImageNet-size JPEG set as prepared by default
    (256 px decode geometry), where the trigger is drawn on the decoded 256 px frame."""
    from benchmarks.synthetic import cifar_like, imagenet_like, poison_runtime
    from engine.data.device_trigger import LabelOnlyOps
    p = "jpeg_attack" if jpeg else "attack"
    bench, reps, epochs = (imagenet_like if jpeg else cifar_like)(s[f"{p}_n"]), s[f"{p}_reps"], s[f"{p}_epochs"]
    batch, image_size, decode_size = (s["jpeg_batch"], 224, 256) if jpeg else (s["attack_batch"], 32, 32)
    threads = max(1, min(workers, 8))
    loaders = {"clean": engine_loader(bench, batch, threads, decode_size, None, drop_last=False)}
    twin_us: dict[str, float] = {}
    for name in ATTACKS:
        runtime, _ = poison_runtime(bench, attack=name, image_size=image_size,
                                    decode_size=decode_size if jpeg else 0, ratio=POISON_RATIO, num_workers=threads)
        loaders[name] = engine_loader(bench, batch, threads, decode_size, runtime.train_ops(), drop_last=False)
        if jpeg:
            # data.trigger_device=device: the CPU loader keeps only the label changes, the
            # trigger is drawn on the device after it (timed here on the CPU, per image).
            loaders[f"{name}@device"] = engine_loader(bench, batch, threads, decode_size,
                                                       LabelOnlyOps(runtime.train_ops()), drop_last=False)
            twin_us[name] = _twin_us_per_triggered_image(runtime, decode_size)
    # A warm-up epoch each (compilation, first touch of the file, trigger memos).
    rates = alternate({k: _epochs(lambda e, x=x: engine_epoch(x, e), epochs) for k, x in loaders.items()}, reps, seed=0)
    med = {k: statistics.median(v) for k, v in rates.items()}
    # Each repetition times the sides back to back, so a ratio within a repetition shares
    # that moment's machine load: its median is the steadier estimate on a shared machine.
    paired = {a: statistics.median(x / c for x, c in zip(rates[a], rates["clean"])) for a in ATTACKS}
    moved = {a: statistics.median(x / c for x, c in zip(rates[f"{a}@device"], rates["clean"]))
             for a in ATTACKS if f"{a}@device" in rates}
    return {"medians": med, "ratio_per_attack": {a: med[a] / med["clean"] for a in ATTACKS},
            "paired_ratio_per_attack": paired, "results": rates,
            "trigger_device": {"paired_loader_ratio_per_attack": moved,
                               "twin_cpu_us_per_triggered_image": twin_us} if jpeg else None,
            "settings": {"images": len(bench.labels), "batch_size": batch, "threads": threads,
                         "repetitions": reps, "epochs_per_repetition": epochs, "decode_size": decode_size,
                         "data": "ImageNet-size JPEG, stored at 256 px" if jpeg else "CIFAR-size raw",
                         "poison_ratio": POISON_RATIO, "attacks": list(ATTACKS)}}


def _twin_us_per_triggered_image(runtime, decode_size: int, batch: int = 32) -> float:
    """The device twin's time per triggered image on this CPU (one thread, median of 5):
    what data.trigger_device=device costs where the device is the CPU. On a GPU the
    prepared check (benchmarks/gpu/) times the same twins."""
    from engine.attacks.device import DevicePoison
    poison = DevicePoison.of(runtime, "train")
    selected = np.flatnonzero(poison.selected)[:batch]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (len(selected), decode_size, decode_size, 3),
                                                                 dtype=np.uint8))
    positions = torch.from_numpy(selected.astype(np.int64))
    poison.apply(images.clone(), positions)  # tables built once
    per_s = [rate(lambda x=images.clone(): (poison.apply(x, positions), len(selected))[1]) for _ in range(5)]
    return 1e6 / statistics.median(per_s)


def run(quick: bool = False, device: str | None = None, workers: int | None = None,
        threads: int | None = None) -> dict:
    """``workers``: FFCV loader threads = DataLoader worker processes (default: the cores;
    1 in quick mode). ``threads``: torch intra-op threads of the engine's views (default:
    what the engine does, FFCV's setting = ``workers``)."""
    from benchmarks.synthetic import cifar_like, imagenet_like, poison_runtime
    s = QUICK if quick else FULL
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Quick: one loader thread and one DataLoader worker, robust on a busy machine.
    workers = workers or (1 if quick else min(os.cpu_count() or 1, 16))
    pin_torch_threads(threads)
    comparisons, measurements, notes = {}, {}, []
    t_start = time.perf_counter()
    # ------------------------------------------------------------ CIFAR-size, raw
    cifar = cifar_like(s["cifar_n"])
    runtime, _ = poison_runtime(cifar, image_size=32, decode_size=0, ratio=POISON_RATIO, num_workers=workers)
    fns = _view_fns(32, imagenet=False)
    # One engine loader per batch size, reused: FFCV compiles each loader on its first epoch.
    eng = {b: engine_loader(cifar, b, workers, 32, runtime.train_ops())
           for b in sorted({s["simclr_batch"], s["weak_batch"]})}
    for i, view, batch in ((0, "simclr", s["simclr_batch"]), (1, "weak", s["weak_batch"])):
        comparisons[f"cifar32/{view}/poisoned"] = _views_vs_reference(
            cifar, runtime, eng[batch], view, fns[i], batch, workers, s["reps"], s["warmup"], dev, images=s["cifar_n"])
    # Trigger overhead, loader alone: many epochs per repetition since the engine's raw
    # loader runs at hundreds of thousands of images per second.
    overhead, comparisons["cifar32/loader_only/poisoned"] = _overhead(
        cifar, runtime, eng[s["weak_batch"]], s["weak_batch"], workers,
        (s["loader_epochs"], s["reference_loader_epochs"]), s, "cifar32", measurements, s["loader_reps"])
    del eng
    # ------------------------------------------------------------ ImageNet-size, JPEG
    jpeg = imagenet_like(s["jpeg_n"])
    runtime_j, _ = poison_runtime(jpeg, image_size=224, decode_size=256, ratio=POISON_RATIO, num_workers=workers)
    # Quick mode reads the JPEGs unpoisoned: the triggering JPEG decoder takes numba
    # several seconds to compile, too long for a smoke run.
    tag = "poisoned" if s["jpeg_poison"] else "clean"
    rt_j = runtime_j if s["jpeg_poison"] else None
    eng_j = engine_loader(jpeg, s["jpeg_batch"], workers, 256, rt_j.train_ops() if rt_j else None)
    for view, fn_spec in zip(("simclr", "weak"), _view_fns(224, imagenet=True)):
        comparisons[f"imagenet224/{view}/{tag}"] = _views_vs_reference(
            jpeg, rt_j, eng_j, view, fn_spec, s["jpeg_batch"], workers, s["jpeg_reps"], s["warmup"], dev,
            images=s["jpeg_n"])
    # The engine loader (decode + trigger + crop/resize + batching) against decoding alone,
    # on a larger set of the same photos: repetitions of about 0.4 s each (on 128 images
    # they took 0.07 s, and single repetitions spread from 1.06x to 1.92x).
    loader_cost = _loader_vs_decode(imagenet_like(s["jpeg_cost_n"]), s, workers, tag, "", s["jpeg_cost_epochs"],
                                    s["jpeg_cost_reps"], measurements)[1]
    # The same photos stored at source resolution (`dbd prepare --decode-size 0`): the
    # loader then crops and resizes every image every epoch.
    r, _ = _loader_vs_decode(imagenet_like(s["jpeg_n"], decode_size=0), s, workers, tag, "source_resolution/",
                             s["jpeg_loader_epochs"], s["loader_reps"], measurements,
                             stored_at_decode_size=lambda e: engine_epoch(eng_j, e))
    comparisons["imagenet224/loader_only/stored_at_decode_size_vs_source_resolution"] = comparison(
        "images/s", r["stored_at_decode_size"], r["loader"])
    # Each sample is delivered once per epoch (so decoded once), both views come from it.
    eng_j.next_epoch = 99
    seen = np.concatenate([idx.numpy().copy() for _, _, idx in eng_j])
    per_sample = len(seen) / len(np.unique(seen))
    measurements["imagenet224/deliveries_per_sample"] = {
        "unit": "deliveries/sample/epoch", "median": per_sample, "reps": [per_sample], "delivered": int(len(seen)),
        "unique": int(len(np.unique(seen)))}
    if s["jpeg_poison"]:
        o, comparisons["imagenet224/loader_only/poisoned"] = _overhead(
            jpeg, runtime_j, eng_j, s["jpeg_batch"], workers, (s["jpeg_loader_epochs"], 1), s, "imagenet224",
            measurements, s["loader_reps"], tag="poisoned_overhead_run")
        overhead.update({f"{side}_jpeg": v for side, v in o.items()})
    else:
        notes.append("quick mode: ImageNet-size figures are unpoisoned, and its trigger overhead is measured in "
                     "full mode only")
    # ------------------------------------------------------------ per attack
    by_attack = trigger_by_attack(s, workers)
    for name, reps_a in by_attack["results"].items():
        measurements[f"trigger/{name}/loader_only"] = measurement("images/s", reps_a)
    for name, ratio in by_attack["ratio_per_attack"].items():
        overhead[f"engine_{name}"] = 1.0 / ratio - 1.0
    by_attack_jpeg = None
    if s["jpeg_poison"]:  # quick mode: the triggering JPEG decoders take too long to compile
        by_attack_jpeg = trigger_by_attack(s, workers, jpeg=True)
        for name, reps_a in by_attack_jpeg["results"].items():
            measurements[f"trigger_jpeg/{name}/loader_only"] = measurement("images/s", reps_a)
        for name, ratio in by_attack_jpeg["paired_ratio_per_attack"].items():
            overhead[f"engine_jpeg_{name}"] = 1.0 / ratio - 1.0
        for name, ratio in by_attack_jpeg["trigger_device"]["paired_loader_ratio_per_attack"].items():
            overhead[f"engine_jpeg_{name}@device"] = 1.0 / ratio - 1.0
    head = comparisons["cifar32/simclr/poisoned"]
    targets = [
        target("loader, CIFAR-size, SimCLR two views, CPU: engine / reference", head["ratio"], ">=", 20.0,
               "" if dev.type == "cpu" else f"measured on {dev.type}; the target is stated for CPU"),
        target("trigger overhead, engine loader, CIFAR-size", overhead["engine"], "<=", 0.05),
        target(f"ImageNet-size: engine loader ({tag}) cost / JPEG decode cost", loader_cost, "<=", 1.3),
        target("ImageNet-size: JPEG decodes (deliveries) per sample per epoch", per_sample, "<=", 1.0)]
    if "engine_jpeg" in overhead:
        targets.append(target("trigger overhead, engine loader, ImageNet-size", overhead["engine_jpeg"], "<=", 0.05))
        targets.append(target("ImageNet-size: engine loader / reference DataLoader, loader alone, poisoned",
                              comparisons["imagenet224/loader_only/poisoned"]["ratio"], ">=", 4.0))
    if by_attack_jpeg is not None:
        for name in ATTACKS:
            targets.append(target(f"trigger overhead, engine loader, ImageNet-size JPEG, {name} (per attack)",
                                  overhead[f"engine_jpeg_{name}"], "<=", 0.05))
            twin = by_attack_jpeg["trigger_device"]["twin_cpu_us_per_triggered_image"][name]
            targets.append(target(f"trigger overhead, CPU loader with data.trigger_device=device, ImageNet-size JPEG, "
                                  f"{name} (per attack)", overhead[f"engine_jpeg_{name}@device"], "<=", 0.05,
                                  f"the trigger then runs on the device: {twin:.0f} us per triggered image on this "
                                  f"CPU, its GPU time in benchmarks gpu"))
    for name in ATTACKS:
        targets.append(target(f"trigger overhead, engine loader, CIFAR-size, {name} (per attack)",
                              overhead[f"engine_{name}"], "<=", 0.05))
    if quick:
        notes.append("quick mode: the per-attack overhead runs on the small set, one repetition")
    return {
        "unit": "images/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
        "headline": "cifar32/simclr/poisoned",
        "settings": {**s, "quick": quick, "workers": workers, "engine_views_device": str(dev),
                     "poison": f"badnets white3x3, {POISON_RATIO:.0%} of the training set",
                     "torch_threads": torch.get_num_threads(), "torch_threads_pinned": threads is not None,
                     "engine": "FFCV loader (uint8, trigger while loading) + kernels views on the device",
                     "reference": "Dataset (NumPy trigger, PIL transforms per sample) + DataLoader workers",
                     "delivered": "normalised float views ready for the model"},
        "comparisons": comparisons, "measurements": measurements, "trigger_overhead": overhead,
        "trigger_by_attack": by_attack, "trigger_by_attack_jpeg": by_attack_jpeg,
        "targets": targets, "notes": notes, "seconds": time.perf_counter() - t_start,
    }

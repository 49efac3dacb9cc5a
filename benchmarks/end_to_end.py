"""The demo pipeline per stage: the engine's data path against the reference loader.

Two measurements, on the embedded digits data and the demo preset
(configs/demo/digits_badnets_dbd.yaml: BadNets 10 %, CIFAR ResNet-18 of width 16):

1. ``pipeline`` (full mode): the real ``dbd run`` of the demo preset with every stage
   cut to one epoch (finetune: its 40 iterations), wall seconds per stage from the
   stages' own ``done.json``. Engine only: it includes what a stage really does
   (loader compilation, evaluation after each epoch, checkpoints).
2. ``epochs``: one epoch of each stage's data + step, alternating between the engine's
   data path (FFCV loader, trigger while loading, ``kernels`` views on the device) and
   the reference's (Dataset with a NumPy trigger and PIL transforms per sample, a
   DataLoader with as many workers as the engine has loader threads), both feeding the
   same model step (benchmarks/rigs.py). The fine-tuning epoch includes its split
   pass (per-sample loss of every training image under training augmentation) and the
   new labelled / unlabelled parts: the engine swaps its loaders' subsets, as the stage
   does; the reference builds new DataLoaders, as the DBD reference code does. In full
   mode it runs 20 of the demo's 40 MixMatch iterations (see FULL).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.measure import alternate, comparison, measurement, pin_torch_threads
from benchmarks.rigs import LinearRig, MixMatchRig, SimCLRRig, SupervisedRig, start, sync

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo" / "digits_badnets_dbd.yaml"
# Full: the demo's width and epochs, 2 alternated repetitions after a warm-up epoch
# (the engine compiles its loaders once per stage). The fine-tuning comparison runs 20
# of the demo's 40 iterations: at 40, its epochs alone would take most of the suite's
# time on a 2-core CPU.
FULL = dict(width=16, reps=2, warmup=1, max_steps=0, finetune_iterations=40, compare_finetune_iterations=20,
            finetune_warmup=1, pipeline=True, overrides=())
# Quick: one loader thread / worker and small batches, so a smoke run stays short even
# on a busy machine (spinning OpenMP threads collapse when cores are oversubscribed).
QUICK = dict(width=4, reps=1, warmup=0, max_steps=1, finetune_iterations=1, compare_finetune_iterations=1,
             finetune_warmup=0, pipeline=False,
             overrides=("data.num_workers=1", "supervised.batch_size=32", "pretrain.batch_size=32",
                        "linear.batch_size=32", "finetune.batch_size=16"))
SPLIT_BATCH = 256


def digits_root() -> tuple[Path, dict]:
    """The demo's data set, prepared once into the benchmark cache."""
    from benchmarks.synthetic import cache_dir
    from engine.data.prepare import load_meta, prepare

    root = cache_dir() / "digits"
    if not (root / "meta.json").is_file():
        prepare("digits", None, root, force=True, progress=False)
    return root, load_meta(root)


def demo_config(root: Path, run_dir: Path, width: int, extra: list[str] | None = None, device: str | None = None):
    from engine.config import load_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_config(DEMO, [f"data.root={root}", f"run_dir={run_dir}", f"model.width={width}",
                              "logging.progress=false", f"device={device}"] + list(extra or []))


def run_pipeline(root: Path, width: int, iterations: int) -> dict:
    """The real demo pipeline, one epoch per stage; seconds per stage."""
    from engine.pipeline import run as run_stages

    with tempfile.TemporaryDirectory(prefix="dbd-e2e-") as tmp:
        cfg = demo_config(root, Path(tmp) / "run", width, [
            "supervised.epochs=1", "supervised.milestones=[1]", "pretrain.epochs=1", "linear.epochs=1",
            "finetune.epochs=1", f"finetune.iterations_per_epoch={iterations}", "finetune.rampup_epochs=1"])
        t0 = time.perf_counter()
        results = run_stages(cfg)
        total = time.perf_counter() - t0
    return {"stages": {name: float(r["seconds"]) for name, r in results.items()}, "total_seconds": total,
            "run": f"dbd run {DEMO.relative_to(DEMO.parent.parent.parent)} with supervised/pretrain/linear/"
                   f"finetune.epochs=1, finetune.iterations_per_epoch={iterations}, model.width={width}"}


def _cycle_reference(loader):
    while True:
        yield from loader


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict:
    """``threads``: torch intra-op threads of the main process (default: the engine's own
    behaviour, FFCV's loader thread count)."""
    from benchmarks.reference import (BadNetsTrigger, InMemoryPoisonDataset, reference_loader, simclr_transform,
                                      weak_transform)
    from engine.attacks.runtime import build_poison
    from engine.data.sources import read_source
    from engine.losses.sce import symmetric_cross_entropy
    from engine.runtime.batching import plan_batch, steps_per_epoch
    from engine.stages.common import train_loader
    from engine.data.loaders import set_indices
    from engine.stages.finetune import cycle
    from engine.stages.split import compute_split, select_lowest, split_loader
    from engine.stages.views import WeakAugment, simclr_spec

    s = QUICK if quick else FULL
    t_start = time.perf_counter()
    pin_torch_threads(threads)
    root, meta = digits_root()
    pipeline = run_pipeline(root, s["width"], s["finetune_iterations"]) if s["pipeline"] else None

    tmp = tempfile.TemporaryDirectory(prefix="dbd-e2e-")
    cfg = demo_config(root, Path(tmp.name), s["width"],
                      [f"finetune.iterations_per_epoch={s['compare_finetune_iterations']}", *s["overrides"]],
                      device=device.split(":")[0] if device else None)
    dist = start(cfg)
    dev = dist.device
    workers = cfg.data.num_workers
    poison = build_poison(cfg, meta, None)
    ctx = SimpleNamespace(cfg=cfg, dist=dist, poison=poison, meta=meta)
    n = int(meta["splits"]["train"]["count"])
    ds = read_source("digits", None).train
    images = np.stack([ds[i][0] for i in range(n)])  # the in-memory array the reference reads
    plan = poison.plan
    trigger = BadNetsTrigger.white3x3(32, 32)

    def ref_dataset(transform, views: int):
        return InMemoryPoisonDataset(images, plan.true_labels, plan.poisoned, plan.target, trigger, transform, views)

    def cap(steps: int) -> int:
        return min(steps, s["max_steps"]) if s["max_steps"] else steps

    comparisons, settings_per_stage = {}, {}

    # ---------------------------------------------------------------- weak-view stages
    for stage, rig_cls, section in (("supervised", SupervisedRig, cfg.supervised), ("linear", LinearRig, cfg.linear)):
        plan_b = plan_batch(section.batch_size, cfg, 1, f"{stage}.batch_size")
        steps = cap(steps_per_epoch(n, plan_b, section.iterations_per_epoch))
        rig = rig_cls(cfg, dist, plan_b.per_rank, int(meta["num_classes"]))
        eng_loader = train_loader(ctx, plan_b.per_rank)
        ref = reference_loader(ref_dataset(weak_transform(rig.augment.spec), 1), plan_b.per_rank, workers)

        def engine_epoch(r, rig=rig, loader=eng_loader, steps=steps):
            loader.next_epoch = r % 1_000_000
            it = iter(loader)
            for i in range(steps):
                img, lab, _ = next(it)
                rig.train(*rig.inputs(img, lab, r % 1_000_000, i))
            it.close()
            sync(dev)
            return steps * rig.images_per_step

        def reference_epoch(r, rig=rig, loader=ref, steps=steps):
            it = iter(loader)
            for _ in range(steps):
                x, y, _ = next(it)
                rig.train(x.to(dev), y.to(dev))
            del it
            sync(dev)
            return steps * rig.images_per_step

        comparisons[f"{stage}/epoch"] = _compare(engine_epoch, reference_epoch, s["reps"], s["warmup"], steps)
        settings_per_stage[stage] = {"batch": plan_b.per_rank, "steps": steps}
        del rig, eng_loader, ref

    # ---------------------------------------------------------------- SimCLR
    p = cfg.pretrain
    plan_b = plan_batch(p.batch_size, cfg, 1, "pretrain.batch_size")
    steps = cap(min(n // plan_b.global_batch, p.iterations_per_epoch or n))
    rig = SimCLRRig(cfg, dist, plan_b.per_rank)
    eng_loader = train_loader(ctx, plan_b.per_rank)
    ref = reference_loader(ref_dataset(simclr_transform(simclr_spec(cfg, p.views)), 2), plan_b.per_rank, workers)

    def simclr_engine(r):
        eng_loader.next_epoch = r % 1_000_000
        it = iter(eng_loader)
        for i in range(steps):
            img, _, _ = next(it)
            rig.train(rig.inputs(img, r % 1_000_000, i))
        it.close()
        sync(dev)
        return steps * rig.images_per_step

    def simclr_reference(r):
        it = iter(ref)
        for _ in range(steps):
            v1, v2, _, _ = next(it)
            rig.train(torch.cat([v1, v2]).to(dev).contiguous(memory_format=torch.channels_last))
        del it
        sync(dev)
        return steps * rig.images_per_step

    comparisons["pretrain/epoch"] = _compare(simclr_engine, simclr_reference, s["reps"], s["warmup"], steps)
    settings_per_stage["pretrain"] = {"batch": plan_b.per_rank, "steps": steps}
    del rig, eng_loader, ref

    # ---------------------------------------------------------------- fine-tuning
    f = cfg.finetune
    B = plan_batch(f.batch_size, cfg, 1, "finetune.batch_size").per_rank
    iters = f.iterations_per_epoch
    rig = MixMatchRig(cfg, dist, B, int(meta["num_classes"]))
    augment = WeakAugment(cfg, f.view)
    weak_tf = weak_transform(augment.spec)
    split_ref = reference_loader(ref_dataset(weak_tf, 1), SPLIT_BATCH, workers, shuffle=False, drop_last=False)

    def reference_split(module) -> np.ndarray:
        losses = np.zeros(n)
        module.eval()
        with torch.no_grad():
            for x, y, idx in split_ref:
                logits = module(x.to(dev))
                losses[idx.numpy()] = symmetric_cross_entropy(logits.float(), y.to(dev), f.sce_alpha, f.sce_beta,
                                                              reduction="none").cpu().numpy()
        module.train()
        return select_lowest(losses, f.epsilon)[0]

    engine_loaders: dict = {}

    def finetune_engine(r):
        epoch = r % 1_000_000
        if "split" not in engine_loaders:
            engine_loaders["split"] = split_loader(ctx)
        split = compute_split(ctx, rig.backend.module, augment, epoch, f.epsilon, f.sce_alpha, f.sce_beta,
                              loader=engine_loaders["split"])
        unlabelled = np.setdiff1d(np.arange(n), split.labelled)
        # As engine/stages/finetune.py: loaders built once, their subsets swapped every epoch.
        if "x" not in engine_loaders:
            engine_loaders["x"] = train_loader(ctx, B, indices=split.labelled, seed_offset=101)
            engine_loaders["u"] = train_loader(ctx, B, indices=unlabelled, seed_offset=202)
        else:
            set_indices(engine_loaders["x"], split.labelled)
            set_indices(engine_loaders["u"], unlabelled)
        xs = cycle(engine_loaders["x"], epoch)
        us = cycle(engine_loaders["u"], epoch)
        for i in range(iters):
            (x_img, x_lab, _), (u_img, _, _) = next(xs), next(us)
            rig.train(*rig.inputs(x_img, x_lab, u_img, epoch, i), epoch, i)
        xs.close()
        us.close()
        sync(dev)
        return iters * rig.images_per_step

    def finetune_reference(r):
        from torch.utils.data import Subset

        labelled = reference_split(rig.backend.module)
        unlabelled = np.setdiff1d(np.arange(n), labelled)
        xs = _cycle_reference(reference_loader(Subset(ref_dataset(weak_tf, 1), labelled.tolist()), B, workers))
        us = _cycle_reference(reference_loader(Subset(ref_dataset(weak_tf, 2), unlabelled.tolist()), B, workers))
        for i in range(iters):
            (xb, x_lab, _), (u1, u2, _, _) = next(xs), next(us)
            rig.train(xb.to(dev), x_lab.to(dev), [u1.to(dev), u2.to(dev)], r % 1_000_000, i)
        xs.close()
        us.close()
        sync(dev)
        return iters * rig.images_per_step

    comparisons["finetune/epoch"] = _compare(
        finetune_engine, finetune_reference, s["reps"], s["finetune_warmup"], iters,
        note=f"split pass over every training image + new labelled/unlabelled subsets + {iters} MixMatch iterations")
    settings_per_stage["finetune"] = {"batch": B, "iterations": iters, "split_batch": SPLIT_BATCH}
    del rig

    from engine.runtime.launch import shutdown

    shutdown()
    tmp.cleanup()
    # The whole DBD defense (pretrain + linear + finetune), epoch for epoch.
    dbd = ("pretrain", "linear", "finetune")
    e_total = sum(comparisons[f"{st}/epoch"]["engine_seconds"] for st in dbd)
    r_total = sum(comparisons[f"{st}/epoch"]["reference_seconds"] for st in dbd)
    measurements = {f"{k}/engine_seconds": measurement("s", c["engine_seconds_reps"]) for k, c in comparisons.items()}
    measurements.update({f"{k}/reference_seconds": measurement("s", c["reference_seconds_reps"])
                         for k, c in comparisons.items()})
    if pipeline is not None:
        for name, sec in pipeline["stages"].items():
            measurements[f"pipeline/{name}/seconds"] = {"unit": "s", "median": sec, "reps": [sec]}
    head = comparisons["pretrain/epoch"]
    return {
        "unit": "images/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
        "headline": "pretrain/epoch",
        "dbd_epoch_seconds": {"engine": e_total, "reference": r_total, "ratio": r_total / e_total},
        "settings": {**s, "quick": quick, "preset": str(DEMO.name), "device": str(dev), "workers": workers,
                     "torch_threads": torch.get_num_threads(), "torch_threads_pinned": threads is not None,
                     "stages": settings_per_stage, "train_images": n,
                     "what": "one epoch of each stage's data + step per repetition, engine and reference alternating"},
        "pipeline": pipeline, "comparisons": comparisons, "measurements": measurements,
        "not_measured": [] if pipeline else ["quick mode: the real demo pipeline run (full mode only)"],
        "seconds": time.perf_counter() - t_start,
    }


def _compare(engine_fn, reference_fn, reps: int, warmup: int, steps: int, note: str = "") -> dict:
    """Alternate whole epochs; report images/s (ratio = speed-up) and seconds per epoch."""
    seconds: dict[str, list[float]] = {"engine": [], "reference": []}

    def timed(side, fn):
        def one(r):
            t0 = time.perf_counter()
            images = fn(r)
            dt = time.perf_counter() - t0
            if r >= 0:
                seconds[side].append(dt)
            return images / dt
        return one

    rates = alternate({"engine": timed("engine", engine_fn), "reference": timed("reference", reference_fn)}, reps,
                      warmup)
    c = comparison("images/s", rates["engine"], rates["reference"], steps=steps, **({"note": note} if note else {}))
    c["engine_seconds_reps"], c["reference_seconds_reps"] = seconds["engine"], seconds["reference"]
    c["engine_seconds"] = float(np.median(seconds["engine"]))
    c["reference_seconds"] = float(np.median(seconds["reference"]))
    return c


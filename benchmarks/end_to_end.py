"""The demo pipeline per stage: the real ``dbd run`` of the demo preset cut to one epoch
per stage (full mode), and one epoch of each real stage fed by the engine's data path or
the reference's, alternating (what each side includes: docs/benchmarks.md)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import stages
from benchmarks.harness import alternate, comparison, measurement, pin_torch_threads, rate, sync

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


def digits_root() -> Path:
    """The demo's data set, prepared once into the benchmark cache."""
    from benchmarks.synthetic import cache_dir
    from engine.data.prepare import prepare
    root = cache_dir() / "digits"
    if not (root / "meta.json").is_file():
        prepare("digits", None, root, force=True, progress=False)
    return root


def run_pipeline(root: Path, s: dict, device: str) -> dict:
    """The real demo pipeline, one epoch per stage; seconds per stage."""
    from engine.pipeline import run as run_stages
    with tempfile.TemporaryDirectory(prefix="dbd-e2e-") as tmp:
        cfg = stages.config(root, preset=DEMO, device=device, width=s["width"], workers=None, extra=[
            f"run_dir={Path(tmp) / 'run'}", "supervised.epochs=1", "supervised.milestones=[1]", "pretrain.epochs=1",
            "linear.epochs=1", "finetune.epochs=1", f"finetune.iterations_per_epoch={s['finetune_iterations']}",
            "finetune.rampup_epochs=1"])
        t0 = time.perf_counter()
        results = run_stages(cfg)
        total = time.perf_counter() - t0
    return {"stages": {name: float(r["seconds"]) for name, r in results.items()}, "total_seconds": total,
            "run": f"dbd run configs/demo/{DEMO.name} with supervised/pretrain/linear/finetune.epochs=1, "
                   f"finetune.iterations_per_epoch={s['finetune_iterations']}, model.width={s['width']}"}


def _compare(engine_fn, reference_fn, reps: int, warmup: int, steps: int, images: int, note: str = "") -> dict:
    """Alternate whole epochs (``fn(epoch) -> images``); images/s (ratio = speed-up) and seconds per epoch."""
    r = alternate({side: lambda k, fn=fn: rate(lambda: fn(k % 1_000_000))  # warm-up rounds pass negative numbers
                   for side, fn in (("engine", engine_fn), ("reference", reference_fn))}, reps, warmup)
    c = comparison("images/s", r["engine"], r["reference"], steps=steps, **({"note": note} if note else {}))
    for side in ("engine", "reference"):
        c[f"{side}_seconds_reps"] = [images / x for x in r[side]]
        c[f"{side}_seconds"] = float(np.median(c[f"{side}_seconds_reps"]))
    return c


def _endless(loader):
    while True:
        yield from loader


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict:
    """``threads``: torch intra-op threads of the main process (default: the engine's own
    behaviour, FFCV's loader thread count)."""
    from torch.utils.data import Subset
    from benchmarks.reference import (BadNetsTrigger, InMemoryPoisonDataset, reference_loader, simclr_transform,
                                      weak_transform)
    from engine.data.sources import read_source
    from engine.defenses.dbd.split import SPLIT_BATCH, compute_split
    from engine.runtime.launch import shutdown
    s = QUICK if quick else FULL
    t_start = time.perf_counter()
    pin_torch_threads(threads)
    device = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    root = digits_root()
    pipeline = run_pipeline(root, s, device) if s["pipeline"] else None
    tmp = tempfile.TemporaryDirectory(prefix="dbd-e2e-")
    cfg = stages.config(root, preset=DEMO, device=device, width=s["width"], workers=None, extra=[
        f"finetune.iterations_per_epoch={s['compare_finetune_iterations']}", *s["overrides"]])
    dist, data = stages.open_run(cfg)
    dev, workers, plan = dist.device, cfg.data.num_workers, data.poison.plan
    n = data.meta.train_count
    ds = read_source("digits", None).train
    images = np.stack([ds[i][0] for i in range(n)])  # the in-memory array the reference reads
    trigger = BadNetsTrigger.white3x3(32, 32)

    def ref_dataset(transform, views: int):
        return InMemoryPoisonDataset(images, plan.true_labels, plan.poisoned, plan.target, trigger, transform, views)

    def reference_batches(stage, B: int, epoch: int):
        """The reference's inputs for ``stage.update`` (per-rank batch ``B``) from its own
        DataLoaders; for fine-tuning, after its own split pass, new DataLoaders over the parts."""
        if stage.name == "pretrain":
            for v1, v2, _, _ in _endless(reference_loader(ref_dataset(simclr_transform(stage.spec), 2), B, workers)):
                yield torch.cat([v1, v2]).to(dev).contiguous(memory_format=torch.channels_last)
        weak = weak_transform(stage.augment.spec)
        if stage.name in ("supervised", "linear"):
            for x, y, _ in _endless(reference_loader(ref_dataset(weak, 1), B, workers)):
                yield x.to(dev), y.to(dev)
        # The reference's split pass: the engine's own loss pass and selection, fed by the
        # reference DataLoader (views already made per sample, in index order).
        f = stage.config
        split = compute_split(data, stage.split.precision, stage.backend.module, lambda x, **_: x, epoch, f.epsilon,
                              f.sce_alpha, f.sce_beta, loader=reference_loader(
                                  ref_dataset(weak, 1), SPLIT_BATCH, workers, shuffle=False, drop_last=False))
        labelled, unlabelled = split.labelled, split.unlabelled
        xs = _endless(reference_loader(Subset(ref_dataset(weak, 1), labelled.tolist()), B, workers))
        us = _endless(reference_loader(Subset(ref_dataset(weak, f.k_views), unlabelled.tolist()), B, workers))
        for (xb, x_lab, _), u in zip(xs, us):
            yield xb.to(dev), [v.to(dev) for v in u[:f.k_views]], x_lab.to(dev)
    comparisons, settings_per_stage = {}, {}
    for name in ("supervised", "pretrain", "linear", "finetune"):
        stage = stages.build(cfg, name, tmp.name, dist, data)
        steps = min(stage.steps_per_epoch, s["max_steps"] or stage.steps_per_epoch)
        B = stage.images_per_step // dist.world_size // (2 if name == "finetune" else 1)  # per rank (and part)

        def engine_epoch(epoch, stage=stage, steps=steps):
            stage.on_epoch_start(epoch)  # fine-tuning: the split pass, then the loaders' subsets swapped
            for step, batch in zip(range(steps), stage.batches(epoch)):
                stage.train_step(batch, epoch, step)
            sync(dev)
            return steps * stage.images_per_step

        def reference_epoch(epoch, stage=stage, steps=steps, B=B):
            if stage.name != "finetune":
                stage.on_epoch_start(epoch)  # the learning rate
            batches = reference_batches(stage, B, epoch)
            for step, inputs in zip(range(steps), batches):
                stage.update(inputs, epoch, step)
            batches.close()
            sync(dev)
            return steps * stage.images_per_step
        finetune = name == "finetune"
        comparisons[f"{name}/epoch"] = _compare(
            engine_epoch, reference_epoch, s["reps"], s["finetune_warmup" if finetune else "warmup"], steps,
            steps * stage.images_per_step,
            note=f"split pass over every training image + new labelled/unlabelled subsets + {steps} MixMatch "
                 f"iterations" if finetune else "")
        settings_per_stage[name] = {"batch": B, "steps": steps, **({"split_batch": SPLIT_BATCH} if finetune else {})}
    shutdown()
    tmp.cleanup()
    # The whole DBD defense (pretrain + linear + finetune), epoch for epoch.
    dbd = ("pretrain", "linear", "finetune")
    e_total = sum(comparisons[f"{st}/epoch"]["engine_seconds"] for st in dbd)
    r_total = sum(comparisons[f"{st}/epoch"]["reference_seconds"] for st in dbd)
    measurements = {f"{k}/{side}_seconds": measurement("s", c[f"{side}_seconds_reps"])
                    for side in ("engine", "reference") for k, c in comparisons.items()}
    for name, sec in (pipeline or {}).get("stages", {}).items():
        measurements[f"pipeline/{name}/seconds"] = {"unit": "s", "median": sec, "reps": [sec]}
    head = comparisons["pretrain/epoch"]
    return {
        "unit": "images/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
        "headline": "pretrain/epoch",
        "dbd_epoch_seconds": {"engine": e_total, "reference": r_total, "ratio": r_total / e_total},
        "settings": {**s, "quick": quick, "preset": DEMO.name, "device": str(dev), "workers": workers,
                     "torch_threads": torch.get_num_threads(), "torch_threads_pinned": threads is not None,
                     "stages": settings_per_stage, "train_images": n,
                     "what": "one epoch of each real stage per repetition: its own data path or the reference's "
                             "feeding its update, alternating"},
        "pipeline": pipeline, "comparisons": comparisons, "measurements": measurements,
        "not_measured": [] if pipeline else ["quick mode: the real demo pipeline run (full mode only)"],
        "seconds": time.perf_counter() - t_start,
    }

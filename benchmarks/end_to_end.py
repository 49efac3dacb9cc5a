"""One epoch of each real DBD stage on the demo preset, fed by the engine's data path or
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
STAGES = ("supervised", "pretrain", "linear", "finetune")
# Full: the demo's width, 2 alternated repetitions after a warm-up epoch (the engine
# compiles its loaders once per stage). Fine-tuning runs 20 of the demo's 40 iterations:
# at 40, its epochs alone would take most of the suite's time on a 2-core CPU.
FULL = dict(width=16, reps=2, warmup=1, max_steps=0, finetune_iterations=20, overrides=())
# Quick: one loader thread / worker and small batches, so a smoke run stays short even
# on a busy machine (spinning OpenMP threads collapse when cores are oversubscribed).
QUICK = dict(width=4, reps=1, warmup=0, max_steps=1, finetune_iterations=1,
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


def _endless(loader):
    while True:
        yield from loader


class ReferenceFeed:
    """The reference's inputs for a stage's ``update``: its Dataset (NumPy trigger, PIL
    views per sample) over the same images and poisoned samples, through DataLoaders."""

    def __init__(self, data, dev, workers: int):
        from benchmarks.reference import BadNetsTrigger
        from engine.data.sources import read_source
        ds = read_source("digits", None).train
        self.images = np.stack([ds[i][0] for i in range(data.meta.train_count)])  # what the reference holds
        self.data, self.dev, self.workers = data, dev, workers
        self.trigger = BadNetsTrigger.white3x3(32, 32)

    def loader(self, transform, views: int, batch: int, subset=None, **kw):
        from torch.utils.data import Subset
        from benchmarks.reference import InMemoryPoisonDataset, reference_loader
        plan = self.data.poison.plan
        ds = InMemoryPoisonDataset(self.images, plan.true_labels, plan.poisoned, plan.target, self.trigger,
                                   transform, views)
        return reference_loader(ds if subset is None else Subset(ds, subset.tolist()), batch, self.workers, **kw)

    def batches(self, stage, batch: int, epoch: int):
        """Per-rank batches of ``batch`` images for ``stage.update``. Fine-tuning first runs
        the engine's own split pass and selection fed by a reference DataLoader (views made
        per sample, in index order), then new DataLoaders over the two parts."""
        from benchmarks.reference import simclr_transform, weak_transform
        from engine.defenses.dbd.split import SPLIT_BATCH, compute_split
        dev = self.dev
        if stage.name == "pretrain":
            for v1, v2, _, _ in _endless(self.loader(simclr_transform(stage.spec), 2, batch)):
                yield torch.cat([v1, v2]).to(dev).contiguous(memory_format=torch.channels_last)
        weak = weak_transform(stage.augment.spec)
        if stage.name in ("supervised", "linear"):
            for x, y, _ in _endless(self.loader(weak, 1, batch)):
                yield x.to(dev), y.to(dev)
        f = stage.config
        split = compute_split(self.data, stage.split.precision, stage.backend.module, lambda x, **_: x, epoch,
                              f.epsilon, f.sce_alpha, f.sce_beta,
                              loader=self.loader(weak, 1, SPLIT_BATCH, shuffle=False, drop_last=False))
        xs = _endless(self.loader(weak, 1, batch, split.labelled))
        us = _endless(self.loader(weak, f.k_views, batch, split.unlabelled))
        for (xb, x_lab, _), u in zip(xs, us):
            yield xb.to(dev), [v.to(dev) for v in u[:f.k_views]], x_lab.to(dev)


def compare_stage(stage, feed: ReferenceFeed, s: dict, world_size: int) -> dict:
    """Whole epochs of ``stage``, its own data path against the reference's, alternating:
    images/s (ratio = speed-up) and seconds per epoch."""
    dev = feed.dev
    steps = min(stage.steps_per_epoch, s["max_steps"] or stage.steps_per_epoch)
    per_rank = stage.images_per_step // world_size // (2 if stage.name == "finetune" else 1)  # (and per part)

    def engine_epoch(epoch: int) -> int:
        stage.on_epoch_start(epoch)  # fine-tuning: the split pass, then the loaders' subsets swapped
        for step, batch in zip(range(steps), stage.batches(epoch)):
            stage.train_step(batch, epoch, step)
        sync(dev)
        return steps * stage.images_per_step

    def reference_epoch(epoch: int) -> int:
        if stage.name != "finetune":
            stage.on_epoch_start(epoch)  # the learning rate
        batches = feed.batches(stage, per_rank, epoch)
        for step, inputs in zip(range(steps), batches):
            stage.update(inputs, epoch, step)
        batches.close()
        sync(dev)
        return steps * stage.images_per_step
    # warm-up rounds pass negative numbers: epochs count from 0 again
    r = alternate({side: lambda k, fn=fn: rate(lambda: fn(k % 1_000_000))
                   for side, fn in (("engine", engine_epoch), ("reference", reference_epoch))}, s["reps"], s["warmup"])
    c = comparison("images/s", r["engine"], r["reference"], steps=steps, batch=per_rank)
    for side in ("engine", "reference"):
        c[f"{side}_seconds_reps"] = [steps * stage.images_per_step / x for x in r[side]]
        c[f"{side}_seconds"] = float(np.median(c[f"{side}_seconds_reps"]))
    return c


def run(quick: bool = False, device: str | None = None, threads: int | None = None) -> dict:
    """``threads``: torch intra-op threads of the main process (default: the engine's own
    behaviour, FFCV's loader thread count)."""
    from engine.runtime.launch import shutdown
    s = QUICK if quick else FULL
    t_start = time.perf_counter()
    pin_torch_threads(threads)
    device = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    cfg = stages.config(digits_root(), preset=DEMO, device=device, width=s["width"], workers=None, extra=[
        f"finetune.iterations_per_epoch={s['finetune_iterations']}", *s["overrides"]])
    dist, data = stages.open_run(cfg)
    feed = ReferenceFeed(data, dist.device, cfg.data.num_workers)
    with tempfile.TemporaryDirectory(prefix="dbd-e2e-") as tmp:
        comparisons = {f"{name}/epoch": compare_stage(stages.build(cfg, name, tmp, dist, data), feed, s,
                                                      dist.world_size) for name in STAGES}
    shutdown()
    # The whole DBD defense (pretrain + linear + finetune), epoch for epoch.
    e_total, r_total = (sum(comparisons[f"{st}/epoch"][f"{side}_seconds"] for st in STAGES[1:])
                        for side in ("engine", "reference"))
    head = comparisons["pretrain/epoch"]
    return {
        "unit": "images/s", "engine": head["engine"], "reference": head["reference"], "ratio": head["ratio"],
        "headline": "pretrain/epoch",
        "dbd_epoch_seconds": {"engine": e_total, "reference": r_total, "ratio": r_total / e_total},
        "settings": {**s, "quick": quick, "preset": DEMO.name, "device": str(dist.device),
                     "workers": cfg.data.num_workers, "torch_threads": torch.get_num_threads(),
                     "torch_threads_pinned": threads is not None, "train_images": data.meta.train_count},
        "comparisons": comparisons,
        "measurements": {f"{k}/{side}_seconds": measurement("s", c[f"{side}_seconds_reps"])
                         for side in ("engine", "reference") for k, c in comparisons.items()},
        "seconds": time.perf_counter() - t_start,
    }

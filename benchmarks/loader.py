"""What on-the-fly poisoning costs the loader: images/s with and without a trigger.

Same raw CIFAR-size ``.beton`` (random 32x32 images, cached by benchmarks.synthetic),
same batch size, same thread count, no augmentation: the loaders differ only by the
attack's operations. Each side runs one warm-up epoch (numba compiles the pipeline),
then full epochs alternating between sides, in a fresh (seeded) random order each
repetition, so a change in the machine's load hits every side alike and no side
always follows the same other one. Figures are medians of the repetitions; every
repetition is kept.

Attacks at BackdoorBench's 10% poisoning ratio (twice the DBD reference's 5%), drawn
from all samples: BadNets (3x3 patch), Blended (full-image blend), WaNet with noise
mode (10% warped + 20% warped with noisy grids: 30% of the images are resampled).
The headline ``engine`` figure is the slowest poisoned loader; ``ratio`` is it over
the clean loader (1.0 = free; the budget is >= 0.95).

``python -m benchmarks.loader [--quick] [--out FILE]`` (full: 20k images, 31 repetitions of 5 epochs per side, about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ATTACKS = ("badnets", "blended", "wanet")
RATIO = 0.1
BATCH = 512


def _loaders(bench, threads: int):
    from engine.attacks.runtime import build_poison
    from engine.config import load_config
    from engine.data.loaders import LoaderSpec, make_loader

    spec = LoaderSpec(root=str(bench.root), split="train", batch_size=BATCH, shuffle=True, drop_last=False,
                      seed=0, num_workers=threads)
    loaders = {"clean": make_loader(spec)}
    for name in ATTACKS:
        cfg = load_config(None, [f"data.name={bench.meta['name']}", f"data.root={bench.root}",
                                 f"data.num_workers={threads}", f"attack.name={name}", "attack.target=0",
                                 f"attack.ratio={RATIO}", "attack.select_from=all"])
        runtime = build_poison(cfg, bench.meta, None)
        loaders[name] = make_loader(spec, poison=runtime.train_ops())
    return loaders


def _epochs(loader, count: int) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    for _ in range(count):
        for images, labels, indices in loader:
            n += images.shape[0]
    return time.perf_counter() - t0, n


def run(quick: bool = False) -> dict:
    from benchmarks.synthetic import cifar_like

    n = 5_000 if quick else 20_000
    reps = 5 if quick else 31
    # An epoch of 20k raw 32 px images takes ~20 ms: several per repetition keep the
    # timer and scheduler noise small against the measured time.
    per_rep = 4 if quick else 5
    threads = max(1, min(os.cpu_count() or 1, 8))
    bench = cifar_like(n)
    loaders = _loaders(bench, threads)
    for loader in loaders.values():
        _epochs(loader, 1)  # warm-up: compilation, first touch of the file, trigger memos
    rates: dict[str, list[float]] = {k: [] for k in loaders}
    names = list(loaders)
    order_rng = random.Random(0)
    for r in range(reps):
        for name in order_rng.sample(names, len(names)):
            seconds, count = _epochs(loaders[name], per_rep)
            rates[name].append(round(count / seconds, 1))
    med = {k: statistics.median(v) for k, v in rates.items()}
    worst = min(ATTACKS, key=lambda a: med[a])
    # Each repetition times the sides back to back, so the ratio within a repetition
    # shares that moment's machine load; its median is the steadier estimate on a
    # shared machine.
    paired = {a: round(statistics.median(x / c for x, c in zip(rates[a], rates["clean"])), 4) for a in ATTACKS}
    return {
        "unit": "img/s",
        "engine": med[worst],
        "reference": med["clean"],
        "ratio": round(med[worst] / med["clean"], 4),
        "engine_label": f"slowest poisoned loader ({worst})",
        "reference_label": "clean loader",
        "medians": med,
        "ratio_per_attack": {a: round(med[a] / med["clean"], 4) for a in ATTACKS},
        "paired_ratio": min(paired.values()),
        "paired_ratio_per_attack": paired,
        "results": rates,
        "settings": {"images": n, "image_size": 32, "batch_size": BATCH, "threads": threads, "repetitions": reps,
                     "epochs_per_repetition": per_rep,
                     "poison_ratio": RATIO, "wanet_noise_cross_ratio": 2.0, "attacks": list(ATTACKS)},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="5k images, 5 repetitions")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = run(args.quick)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from engine.fsutil import write_text

        write_text(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

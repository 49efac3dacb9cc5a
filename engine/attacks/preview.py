"""``dbd preview``: clean vs triggered samples and their difference, amplified.

Both rows come from real loaders over the same samples (one clean, one with the
attack's operations), so the picture shows exactly what training or evaluation sees.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from engine.attacks import ATTACKS
from engine.attacks.config import NONE
from engine.attacks.export import collect, loader_for
from engine.errors import UserError


def pick(candidates: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` indices spread evenly over ``candidates``."""
    if len(candidates) <= count:
        return np.asarray(candidates, dtype=np.int64)
    at = np.linspace(0, len(candidates) - 1, count).round().astype(np.int64)
    return np.asarray(candidates, dtype=np.int64)[at]


def preview_samples(runtime, split: str, count: int, log=print) -> dict:
    """Arrays for the figure: clean, triggered, indices, labels before and after, notes."""
    from engine.attacks.ops import AttackOps

    if runtime.name == NONE:
        raise UserError("attack.name is none: there is no trigger to preview")
    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, got {split!r}")
    plan, note = runtime.plan, ""
    if split == "train":
        pois, noise = plan.poisoned_indices, plan.noise_indices
        n_noise = min(len(noise), count // 4) if len(noise) else 0
        indices = np.sort(np.concatenate([pick(pois, count - n_noise), pick(noise, n_noise)]))
        try:
            ops = runtime.train_ops()
        except UserError as e:
            stand_in = ATTACKS[runtime.name].preview_stand_in(runtime)
            if stand_in is None:
                raise
            note = "test-time trigger only (its prepared inputs are missing)"
            log(f"note: {e}; showing the {note}")
            ops = AttackOps(stand_in, runtime.train_selected)
        before, after = plan.true_labels[indices], plan.labels[indices]
    else:
        indices = pick(runtime.poisoned_test_indices, count)
        ops = runtime.test_ops()
        before = after = runtime.test_labels[indices]
    clean, _, got_clean = collect(loader_for(runtime.cfg, split, indices, None))
    triggered, labels, got = collect(loader_for(runtime.cfg, split, indices, ops))
    if not (np.array_equal(got_clean, indices) and np.array_equal(got, indices)):
        raise RuntimeError("the loaders returned samples in an unexpected order")
    return {"clean": clean, "triggered": triggered, "indices": indices, "before": before,
            "after": labels if split == "train" else after,
            "noise": plan.noise[indices] if split == "train" else np.zeros(len(indices), bool), "note": note}


def render(samples: dict, out: str | Path, *, title: str, amplify: float, classes: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.fsutil import write_bytes

    clean, trig = samples["clean"], samples["triggered"]
    n = len(clean)
    diff = np.clip(np.abs(trig.astype(np.int16) - clean.astype(np.int16)) * amplify, 0, 255).astype(np.uint8)

    def name(y: int) -> str:
        return classes[y] if classes and 0 <= y < len(classes) else str(y)

    fig, axes = plt.subplots(3, n, figsize=(1.6 * n + 0.8, 5.4), squeeze=False)
    rows = (("clean", clean), ("triggered", trig), (f"|diff| x{amplify:g}", diff))
    for r, (label, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label)
            if r == 0:
                b, a = int(samples["before"][c]), int(samples["after"][c])
                change = f"{name(b)}" if a == b else f"{name(b)}->{name(a)}"
                tag = " noise" if samples["noise"][c] else ""
                ax.set_title(f"#{int(samples['indices'][c])}{tag}\n{change}", fontsize=8)
    fig.suptitle(title + (f" ({samples['note']})" if samples["note"] else ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    out = Path(out)
    write_bytes(out, buf.getvalue())
    return out


def preview(cfg, runtime, out: str | Path, *, split: str = "train", count: int = 8, amplify: float = 5.0,
            log=print) -> Path:
    if count < 1:
        raise UserError(f"--count must be >= 1, got {count}")
    if amplify <= 0:
        raise UserError(f"--amplify must be > 0, got {amplify}")
    samples = preview_samples(runtime, split, count, log=log)
    if len(samples["indices"]) == 0:
        raise UserError(f"the {split} split has no triggered sample to show")
    h, w = samples["clean"].shape[1:3]
    plan = runtime.plan
    if split == "train":
        extra = f", {int(plan.noise.sum())} noise-mode" if plan.noise.any() else ""
        what = (f"{int(plan.poisoned.sum())}/{len(plan.poisoned)} training samples poisoned "
                f"({plan.settings['label_mode']}){extra}")
    else:
        what = (f"all {len(runtime.poisoned_test_indices)} test images (target y+1 mod C)" if runtime.all_to_all
                else f"{len(runtime.poisoned_test_indices)} test images whose label is not the target")
    target = "y+1 mod C" if runtime.all_to_all else runtime.target
    title = f"{runtime.name} on {runtime.meta.get('name')}, {split} ({h}x{w}), target {target}: {what}"
    return render(samples, out, title=title, amplify=amplify, classes=runtime.meta.get("classes"))

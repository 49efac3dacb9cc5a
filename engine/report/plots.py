"""PNG plots of a run (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np



def _order(records: list[dict], order: list[str] | None) -> list[str]:
    """``order`` (the run's stage order) first, then any other stage in record order."""
    seen = list(dict.fromkeys(r["stage"] for r in records if "stage" in r))
    first = [s for s in (order or []) if s in seen]
    return first + [s for s in seen if s not in first]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from engine.fsutil import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_curves(records: list[dict], out: Path, order: list[str] | None = None) -> list[Path]:
    plt = _plt()
    paths = []
    steps = [r for r in records if r.get("kind") == "step" and "loss" in r]
    stages = _order(steps, order)
    if stages:
        fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3), squeeze=False)
        for ax, s in zip(axes[0], stages):
            rs = [r for r in steps if r["stage"] == s]
            ax.plot([r["global_step"] for r in rs], [r["loss"] for r in rs], lw=1)
            ax.set_title(f"{s} loss")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        paths.append(_save(fig, out / "loss.png"))
    evals = [r for r in records if r.get("kind") == "eval"]
    if evals:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
        for s in _order(evals, order):
            rs = sorted({r["epoch"]: r for r in evals if r["stage"] == s}.values(), key=lambda r: r["epoch"])
            if not rs:
                continue
            ax1.plot([r["epoch"] for r in rs], [r["BA"] for r in rs], marker="o", ms=3, label=s)
            if "ASR" in rs[0]:
                ax2.plot([r["epoch"] for r in rs], [r["ASR"] for r in rs], marker="o", ms=3, label=s)
        ax1.set_title("clean accuracy (BA) per epoch")
        ax2.set_title("attack success rate (ASR) per epoch")
        for ax in (ax1, ax2):
            ax.set_xlabel("epoch")
            ax.set_ylabel("%")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
            ax.legend()
        paths.append(_save(fig, out / "accuracy_asr.png"))
    return paths


def plot_split(records: list[dict], out: Path) -> list[Path]:
    rs = sorted({r["epoch"]: r for r in records if r.get("kind") == "split"}.values(), key=lambda r: r["epoch"])
    if not rs:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["epoch"] for r in rs], [r["labelled_poison_share"] for r in rs], marker="o", ms=3,
            label="poisoned share of labelled part")
    ax.plot([r["epoch"] for r in rs], [r["poisoned_in_labelled"] for r in rs], marker="s", ms=3,
            label="poisoned samples kept labelled")
    ax.set_xlabel("fine-tuning epoch")
    ax.set_ylabel("%")
    ax.set_title("DBD split: poisoned samples in the labelled part")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out / "split.png")]


def plot_features(run_dir: Path, out: Path, cfg: dict, titles: dict[str, str] | None = None) -> list[Path]:
    """The paper's picture: supervised features cluster the poisoned samples together,
    SimCLR features leave them beside the clean images of their true class.

    One panel per stage that saved ``features.npz``; ``titles`` (stage -> title, in the
    run's stage order) names and orders them, else folder order and stage names."""
    from engine.rundir import FEATURES

    names = list(titles) if titles else sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    panels = [(s, run_dir / s / FEATURES) for s in names]
    panels = [(s, p) for s, p in panels if p.is_file()]
    if not panels:
        return []
    from sklearn.manifold import TSNE

    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, (stage, path) in zip(axes[0], panels):
        d = np.load(path)
        feats, labels, pois = d["features"], d["true_labels"], d["poisoned"].astype(bool)
        feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
        xy = TSNE(n_components=2, init="pca", perplexity=min(30, max(5, len(feats) // 10)),
                  random_state=0).fit_transform(feats)
        sc = ax.scatter(xy[~pois, 0], xy[~pois, 1], c=labels[~pois], cmap="tab10", s=6, alpha=0.7)
        ax.scatter(xy[pois, 0], xy[pois, 1], c="black", marker="x", s=14, lw=0.8, label="poisoned")
        title = (titles or {}).get(stage, stage)
        ax.set_title(f"{title}: t-SNE of features")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="lower right", fontsize=8)
        fig.colorbar(sc, ax=ax, label="true class", fraction=0.04)
    return [_save(fig, out / "features_tsne.png")]

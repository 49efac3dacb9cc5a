"""PNG plots of a run (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.rundir import NO_DEFENSE


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


def plot_epoch_lines(records: list[dict], out: Path, kind: str, spec) -> list[Path]:
    """A defense column's plot (engine.report.columns.EpochPlot): the per-epoch records
    of ``kind``, the last write of each epoch winning, one line per field."""
    rs = sorted({r["epoch"]: r for r in records if r.get("kind") == kind}.values(), key=lambda r: r["epoch"])
    if not rs:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for field, label, marker in spec.lines:
        ax.plot([r["epoch"] for r in rs], [r[field] for r in rs], marker=marker, ms=3, label=label)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    ax.set_title(spec.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return [_save(fig, out / spec.file)]


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


# --------------------------------------------------------------------------- a sweep's leaderboard

FAILED_GID = "failed:"  # the gid of every artist that marks a failed row, followed by the row's name


def _drawn(ax) -> dict:
    """What the axes actually show, read back from its artists (so a test checks the
    figure, not the input): the rows drawn as results and those marked failed."""
    artists = [a for a in [*ax.collections, *ax.patches] if a.get_gid()]
    marked = [a for a in artists if a.get_gid().startswith(FAILED_GID)]
    at = {a.get_gid()[len(FAILED_GID):]: tuple(float(v) for v in a.get_offsets()[0])
          for a in marked if hasattr(a, "get_offsets")}
    return {"rows": [a.get_gid() for a in artists if a not in marked],
            "failed": [a.get_gid()[len(FAILED_GID):] for a in marked], "failed_at": at}


def plot_leaderboard_ba_asr(points: list[dict], out: Path) -> tuple[Path, dict]:
    """BA against ASR, one marker per row with a result (``points``: name, defense, BA,
    ASR, ``baseline``: the (ASR, BA) of its no-defense row or None, ``failed``: its failed
    cells). A row with failed cells also gets a red x, labelled FAILED, at its own point,
    else at its no-defense row's point (where it would have started from), else at the
    bottom middle: a failure is never just a missing marker. Returns the path and what
    was drawn (``_drawn``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    placed_low = False
    for p in points:
        if p["BA"] is None:
            continue
        ax.scatter(p["ASR"], p["BA"], marker="o" if p["defense"] == NO_DEFENSE else "^", s=60,
                   color="tab:red" if p["defense"] == NO_DEFENSE else "tab:blue", zorder=3, gid=p["name"])
        ax.annotate(p["name"], (p["ASR"], p["BA"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if p["baseline"] is not None:
            ax.annotate("", xy=(p["ASR"], p["BA"]), xytext=p["baseline"],
                        arrowprops=dict(arrowstyle="->", color="gray", lw=1.2), zorder=2)
    for p in points:
        if not p["failed"]:
            continue
        if p["BA"] is not None:
            xy = (p["ASR"], p["BA"])
        elif p["baseline"] is not None:
            xy = p["baseline"]
        else:
            xy, placed_low = (50.0, 0.0), True
        ax.scatter(*xy, marker="x", s=120, linewidths=2.5, color="red", zorder=4, gid=FAILED_GID + p["name"])
        ax.annotate(f"FAILED: {p['name']} ({p['failed']} cell{'s' if p['failed'] > 1 else ''})", xy,
                    textcoords="offset points", xytext=(6, -11), fontsize=7, color="red", fontweight="bold")
    ax.set_xlabel("ASR (%)")
    ax.set_ylabel("BA (%)")
    ax.set_xlim(-5, 105)
    if placed_low:
        ax.set_ylim(bottom=-5)
    ax.set_title("BA against ASR per cell (red: no defense, blue: defense; arrow: no defense -> defense;\n"
                 "red x: failed cells, at the row's own or its no-defense point)", fontsize=9)
    ax.grid(alpha=0.3)
    drawn = _drawn(ax)
    return _save(fig, out), drawn


def plot_leaderboard_cost(bars: list[dict], out: Path, unit: str) -> tuple[Path, dict]:
    """Wall time and device-hours per row (``bars``: name, wall_seconds, device_hours,
    ``failed``: its failed cells, ``error``). A row with failed cells gets a hatched red
    placeholder bar labelled FAILED (a failed cell records no cost), below its own bar
    when some of its seeds finished. Returns the path and what was drawn."""
    plt = _plt()
    rows: list[tuple[str, dict, bool]] = []  # (label, bar, failed placeholder)
    for b in bars:
        if b["wall_seconds"] is not None:
            rows.append((b["name"], b, False))
        if b["failed"]:
            rows.append((f"{b['name']} FAILED", b, True))
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.45 * len(rows) + 1.5), sharey=True)
    ys = list(range(len(rows)))
    for ax, key, scale, color, xlabel in ((axes[0], "wall_seconds", 60.0, "tab:gray", "wall time per cell (min)"),
                                          (axes[1], "device_hours", 1.0, "tab:green", f"{unit} per cell")):
        widths = [(b[key] or 0.0) / scale for _, b, failed in rows if not failed]
        placeholder = max(widths, default=0.0) * 0.25 or 1.0
        for y, (name, b, failed) in zip(ys, rows):
            if failed:
                ax.barh(y, placeholder, color="none", edgecolor="red", hatch="///", lw=1.2,
                        gid=FAILED_GID + b["name"])
                ax.text(placeholder, y, f"  FAILED ({b['failed']})", va="center", color="red", fontsize=8,
                        fontweight="bold")
            else:
                ax.barh(y, (b[key] or 0.0) / scale, color=color, gid=b["name"])
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [name for name, _, _ in rows])
    axes[0].invert_yaxis()
    drawn = _drawn(axes[0])
    return _save(fig, out), drawn

"""``logging.tensorboard: true``: every scalar of ``metrics.jsonl`` as a TensorBoard event
file in ``<run_dir>/tensorboard/`` (rank 0 only: the records are rank 0's).

The event file is rebuilt from the records whenever the report is (the end of every
``dbd run``, and ``dbd report``), so it always agrees with ``metrics.jsonl``: a resumed
stage's replayed steps appear once, the last write winning, exactly as in the report's
plots. Tags are ``<stage>/<kind>/<field>`` (``finetune/step/loss``,
``finetune/eval/BA``, ``finetune/split/labelled_poison_share``); the x axis is the
record's ``global_step`` for step records and its ``epoch`` for per-epoch ones.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

from engine.errors import UserError

FOLDER = "tensorboard"
# Bookkeeping fields: positions on the x axis or identifiers, never curves.
_NOT_SCALARS = {"time", "epoch", "step", "global_step", "world_size", "rank"}


def scalars(records: list[dict]) -> dict[str, dict[int, tuple[float, float]]]:
    """tag -> x -> (value, wall time), the last record for each x winning."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for r in records:
        x = r.get("global_step", r.get("epoch"))
        if not isinstance(x, int) or isinstance(x, bool):
            continue
        prefix = f"{r.get('stage', 'run')}/{r.get('kind', 'record')}"
        for key, value in r.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                out.setdefault(f"{prefix}/{key}", {})[x] = (float(value), float(r.get("time") or 0.0))
    return out


def write_events(records: list[dict], run_dir: Path) -> Path:
    """Replace ``<run_dir>/tensorboard/`` with one event file holding ``scalars(records)``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard needs the tensorboard package: pip install 'dbd-engine[tensorboard]'") \
            from None
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    # The live files the run wrote as it trained (engine/report/live.py): this file replaces them.
    shutil.rmtree(folder / "live", ignore_errors=True)
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for tag, points in scalars(records).items():
            for x in sorted(points):
                value, wall = points[x]
                writer.add_scalar(tag, value, global_step=x, walltime=wall or None)
    finally:
        writer.close()
    return folder


def plot_event_curves(folder: Path, out: Path, tags: list[str]) -> Path:
    """A PNG of some tags, read back from the event file by TensorBoard's own reader: what
    a TensorBoard user sees (docs/tensorboard.md shows the demo's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from engine.report.plots import _plt, _save

    acc = EventAccumulator(str(folder))
    acc.Reload()
    plt = _plt()
    fig, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        events = acc.Scalars(tag)
        ax.plot([e.step for e in events], [e.value for e in events], lw=1.2)
        ax.set_title(tag, fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, Path(out))

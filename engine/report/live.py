"""Live sinks: every ``metrics.jsonl`` record also to TensorBoard and Weights & Biases as it
is written, so a run can be watched while it trains. Rank 0 only (only rank 0's
``MetricsWriter`` writes).

- ``logging.tensorboard: true``: ``<run_dir>/tensorboard/live/`` while the run trains,
  one event file per process start. When the report is built the folder is replaced by
  the event file rebuilt from ``metrics.jsonl`` (engine/report/tensorboard.py), where a
  resumed stage's replayed steps appear once; until then TensorBoard shows them twice.
- ``logging.wandb: offline | online``: one W&B run per run dir. Its id is kept in
  ``<run_dir>/wandb_id``, so a resumed run logs into the same W&B run (``resume="allow"``);
  offline, the run lands in ``<run_dir>/wandb/offline-run-*`` and ``wandb sync`` uploads it.
  Each record's scalars are logged as ``<stage>/<kind>/<field>``, with
  ``<stage>/<kind>/x`` (its ``global_step`` or ``epoch``) as the x axis of that group.
"""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any, Protocol

from engine.errors import UserError
from engine.report.tensorboard import FOLDER, scalars

LIVE = "live"  # the live event files' folder under tensorboard/
WANDB_ID = "wandb_id"
WANDB_MODES = ("off", "offline", "online")


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None:  # idempotent
        ...


class TensorBoardLive:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("logging.tensorboard needs the tensorboard package: pip install "
                            "'dbd-engine[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / FOLDER / LIVE), flush_secs=10)
        self.closed = False

    def write(self, record: dict) -> None:
        for tag, points in scalars([record]).items():
            for x, (value, wall) in points.items():
                self.writer.add_scalar(tag, value, global_step=x, walltime=wall or None)
        self.writer.flush()  # live: a record is on disk when metrics.jsonl has it, a kill loses none

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class WandbLive:
    def __init__(self, run_dir: Path, mode: str, project: str, entity: str, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("logging.wandb needs the wandb package: pip install 'dbd-engine[wandb]'") from None
        run_dir = Path(run_dir)
        id_file = run_dir / WANDB_ID
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            from engine.fsutil import write_text

            run_id = secrets.token_hex(8)
            write_text(id_file, run_id + "\n")
        self.run = wandb.init(project=project, entity=entity or None, dir=str(run_dir), id=run_id, resume="allow",
                              mode=mode, name=run_dir.name, config=config, reinit="finish_previous",
                              settings=wandb.Settings(console="off", x_disable_stats=True))
        self.groups: set[str] = set()
        self.closed = False

    def write(self, record: dict) -> None:
        x = record.get("global_step", record.get("epoch"))
        points = scalars([record])
        if not points:
            return
        group = f"{record.get('stage', 'run')}/{record.get('kind', 'record')}"
        if group not in self.groups:
            self.groups.add(group)
            self.run.define_metric(f"{group}/x")
            self.run.define_metric(f"{group}/*", step_metric=f"{group}/x")
        row: dict[str, Any] = {tag: value for tag, by_x in points.items() for value, _ in by_x.values()}
        self.run.log({**row, f"{group}/x": x})

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.run.finish()


def open_sinks(logging, run_dir: Path, config: dict) -> list:
    """The live sinks ``logging`` asks for (call on rank 0 only)."""
    sinks: list = []
    if logging.tensorboard:
        sinks.append(TensorBoardLive(run_dir))
    if logging.wandb != "off":
        sinks.append(WandbLive(run_dir, logging.wandb, logging.wandb_project, logging.wandb_entity, config))
    return sinks

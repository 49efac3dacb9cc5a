"""What the pipeline hands every stage."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config import Config
from engine.errors import UserError
from engine.report.metrics import MetricsWriter

DONE = "done.json"
MODEL = "model.pt"


@dataclass
class StageContext:
    cfg: Config
    name: str
    run_dir: Path
    dist: Any  # engine.runtime.launch.DistInfo
    meta: dict  # dataset meta.json
    poison: Any  # engine.attacks.runtime.PoisonRuntime
    metrics: MetricsWriter
    extra: dict = field(default_factory=dict)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def upstream_model(self, stage: str) -> Path:
        """The final weights of an earlier stage, which must be complete."""
        d = self.run_dir / stage
        if not (d / DONE).is_file() or not (d / MODEL).is_file():
            raise UserError(f"stage {self.name!r} needs the finished {stage!r} stage: "
                            f"{d / MODEL} is missing (add {stage!r} to stages, or run it first)")
        return d / MODEL

    def upstream_summary(self, stage: str) -> dict:
        d = self.run_dir / stage / DONE
        return json.loads(d.read_text()) if d.is_file() else {}

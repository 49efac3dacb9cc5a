"""The run configuration: typed dataclasses, loaded from YAML, overridden by ``a.b=c``.

``Config`` is assembled from its parts: the shared sections (``engine.settings``) and
one section per registered stage, each defined beside its stage class, so adding a
stage adds its section here without an edit. Every default is the DBD reference
setting; validation happens once, at load time, so a bad value fails before any work.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from engine.attacks.config import AttackConfig
from engine.settings import (DataConfig, DistributedConfig, LoggingConfig, ModelConfig, RuntimeConfig, check, from_dict,
                             load_raw, set_dotted, to_dict)
from engine.models import BACKBONES
from engine.rundir import CONFIG
from engine.runtime.backends import ENGINES
from engine.stages import STAGES, default_stages

__all__ = ["Config", "load_config", "to_dict", "dump_yaml", "save_resolved"]


class _ConfigBase:
    def validate(self) -> None:
        check(len(self.stages) > 0, "stages", "must list at least one stage")
        for s in self.stages:
            check(s in STAGES, "stages", f"unknown stage {s!r}: must be among {', '.join(STAGES)}")
        check(self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda")
        check(self.precision in ("fp32", "bf16", "fp16"), "precision", "must be fp32, bf16 or fp16")
        ENGINES.lookup(self.distributed.engine, "distributed.engine")
        BACKBONES.lookup(self.model.arch, "model.arch")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and hasattr(section, "validate"):
                section.validate()

    def section(self, stage: str) -> Any:
        """The config section of stage ``stage``."""
        return getattr(self, stage)


def _config_class() -> type:
    shared = [
        ("run_dir", str, field(default="runs/default")),
        # A folder of stages shared between runs, keyed by what each stage depends on
        # (engine.stages.store): empty = off, every stage trains in the run dir.
        ("stage_store", str, field(default="")),
        ("stages", tuple[str, ...], field(default=default_stages())),
        ("seed", int, field(default=0)),
        ("device", str, field(default="auto")),  # auto | cpu | cuda
        ("precision", str, field(default="fp32")),  # fp32 | bf16 | fp16
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("attack", AttackConfig, field(default_factory=AttackConfig)),
        ("model", ModelConfig, field(default_factory=ModelConfig)),
    ]
    placed = sorted(STAGES.values(), key=lambda c: (c.default_position is None, c.default_position or 0, c.name))
    stages = [(c.name, c.config_class, field(default_factory=c.config_class)) for c in placed]
    tail = [("distributed", DistributedConfig, field(default_factory=DistributedConfig)),
            ("runtime", RuntimeConfig, field(default_factory=RuntimeConfig)),
            ("logging", LoggingConfig, field(default_factory=LoggingConfig))]
    clash = {c.name for c in placed} & {n for n, _, _ in shared + tail}
    if clash:
        raise RuntimeError(f"stage names clash with config sections: {sorted(clash)}")
    cls = dataclasses.make_dataclass("Config", shared + stages + tail, bases=(_ConfigBase,))
    cls.__module__ = __name__
    return cls


Config = _config_class()


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> Any:
    """Defaults, then the YAML file (if any), then ``dotted.key=value`` overrides, then
    ``values`` (dotted keys to already-typed values, as a sweep's grid gives them)."""
    raw = load_raw(path, overrides)
    for key, value in (values or {}).items():
        set_dotted(raw, key, value)
    cfg = from_dict(Config, raw, prefix="")
    cfg.validate()
    return cfg


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_resolved(cfg: Any, run_dir: str | Path) -> Path:
    """Write the resolved config next to the run's outputs (atomically)."""
    from engine.fsutil import write_text

    out = Path(run_dir) / CONFIG
    write_text(out, dump_yaml(cfg))
    return out

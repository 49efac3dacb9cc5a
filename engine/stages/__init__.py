"""The machinery every defense's stages run on (the ``Stage`` base, the Trainer,
evaluation, stage keys and the shared stage store), and the registry of stages.

The stages themselves live in their defense's folder under ``engine/defenses/``.
Importing this package imports that package too, so every stage is registered in
:data:`engine.stages.base.STAGES` whichever package a caller imports first (see
README.md in this folder).
"""
from __future__ import annotations

import importlib
import pkgutil

from engine.stages.base import STAGES, Stage, StageEnv, default_stages, stage_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
importlib.import_module("engine.defenses")  # registers every defense's stages

__all__ = ["STAGES", "Stage", "StageEnv", "default_stages", "stage_class"]

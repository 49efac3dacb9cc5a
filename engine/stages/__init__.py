"""The training stages: DBD's (pretrain, linear, finetune), the no-defense baseline
(supervised) and any other ``Stage`` subclass in this package.

Importing the package imports every module in it, and each ``Stage`` subclass with a
``name`` registers itself in :data:`engine.stages.base.STAGES`: a new stage is one new
file here (see README.md in this folder).
"""
from __future__ import annotations

import importlib
import pkgutil

from engine.stages.base import STAGES, Stage, StageEnv, default_stages, stage_class

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["STAGES", "Stage", "StageEnv", "default_stages", "stage_class"]

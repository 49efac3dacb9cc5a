"""The defenses: one folder each, holding its stages (and, beside each class, its config).

- ``none/``: the no-defense baseline (``supervised``), the row every defense is measured
  against;
- ``dbd/``: DBD (SimCLR ``pretrain``, the ``linear`` SCE head, the ``split`` and the
  MixMatch ``finetune``; ``finetune_labelled``, its labelled-only ablation);
- ``abl/``: ABL in one stage (``abl``: isolation, the isolated set, fine-tuning, ascent);
- ``asd/``: ASD in one stage (``asd``: DBD's MixMatch step on pools re-drawn every epoch).

Importing this package imports every module of every defense folder, and each ``Stage``
subclass with a ``name`` registers itself in ``engine.stages.base.STAGES``: a new
defense is one new folder here, or in a folder named by ``DBD_DEFENSE_PATH``
(engine/stages/README.md has the worked example). A folder's ``__init__.py`` may define
``report_columns()``: the figures the defense adds to the report and the leaderboard
(engine/report/columns.py). The shared machinery the stages run on (the Trainer,
evaluation, keys and the stage store) stays in ``engine.stages``.
"""
from __future__ import annotations

import importlib
import os
import pkgutil

# Folders of defenses kept outside this tree (a lab's own, or a test's throwaway one),
# separated by os.pathsep: each folder in them is a defense, loaded like those here.
PATH_ENV = "DBD_DEFENSE_PATH"


def _extra_folders() -> list[str]:
    folders = [p for p in os.environ.get(PATH_ENV, "").split(os.pathsep) if p]
    for folder in folders:
        if not os.path.isdir(folder):
            from engine.errors import UserError

            raise UserError(f"{PATH_ENV} names {folder}, which is not a folder")
    return folders


__path__ = [*__path__, *_extra_folders()]

DEFENSES: list[str] = []  # the defense folders, in name order
_COLUMNS: list = []  # every folder's report_columns(), in folder order

for _folder in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _folder.ispkg:
        continue
    _package = importlib.import_module(f"{__name__}.{_folder.name}")
    for _module in sorted(pkgutil.iter_modules(_package.__path__), key=lambda m: m.name):
        importlib.import_module(f"{_package.__name__}.{_module.name}")
    DEFENSES.append(_folder.name)
    if hasattr(_package, "report_columns"):
        _COLUMNS.extend(_package.report_columns())


def report_columns() -> list:
    """Every defense's own report and leaderboard figures (engine.report.columns), for
    ``build_report`` and ``build_leaderboard``."""
    return list(_COLUMNS)


__all__ = ["DEFENSES", "report_columns"]

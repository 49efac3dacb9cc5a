"""One reader per on-disk dataset format, one module each.

A reader turns a source path into a :class:`SourceDataset` per split. Readers check
the layout up front and raise :class:`engine.errors.UserError` with one clear line,
so a wrong folder fails before any ``.beton`` is started. Each module registers its
``read`` in :data:`SOURCES` by dataset name (``@SOURCES.register("cifar10")``), and
importing this package imports every module: a new format is one new file here.
"""
from __future__ import annotations

import sys

from engine.data.sources.base import SOURCES, SourceDataset, SourceSplits

SOURCES.load(sys.modules[__name__])
READERS = tuple(SOURCES)  # the dataset names ``dbd prepare`` accepts


def read_source(name: str, source: str | None, **options) -> SourceSplits:
    return SOURCES.lookup(name)(source, **options)


__all__ = ["READERS", "SOURCES", "SourceDataset", "SourceSplits", "read_source"]

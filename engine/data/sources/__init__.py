"""One reader per on-disk dataset format.

A reader turns a source path into a :class:`SourceDataset` per split. Readers check
the layout up front and raise :class:`engine.errors.UserError` with one clear line,
so a wrong folder fails before any ``.beton`` is started.
"""
from __future__ import annotations

from engine.data.sources.base import SourceDataset, SourceSplits

READERS = ("cifar10", "cifar100", "gtsrb", "tinyimagenet", "imagefolder", "digits")


def read_source(name: str, source: str | None, **options) -> SourceSplits:
    from engine.errors import UserError

    if name == "cifar10":
        from engine.data.sources.cifar10 import read
    elif name == "cifar100":
        from engine.data.sources.cifar100 import read
    elif name == "gtsrb":
        from engine.data.sources.gtsrb import read
    elif name == "tinyimagenet":
        from engine.data.sources.tinyimagenet import read
    elif name == "imagefolder":
        from engine.data.sources.imagefolder import read
    elif name == "digits":
        from engine.data.sources.digits import read
    else:
        raise UserError(f"unknown dataset {name!r}: must be one of {', '.join(READERS)}")
    return read(source, **options)


__all__ = ["READERS", "SourceDataset", "SourceSplits", "read_source"]

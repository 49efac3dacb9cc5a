"""Fixtures of the attack tests: a JPEG ImageFolder set at source resolution, the same
photos stored raw, and stored at a decode geometry."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def photo_tree(tmp_path_factory) -> Path:
    from tests.builders import write_imagefolder

    # Three classes of real photo crops of assorted sizes (40-90 px), JPEG files.
    return write_imagefolder(tmp_path_factory.mktemp("photos") / "src", per_class=4)


@pytest.fixture(scope="session")
def jpeg_root(photo_tree, tmp_path_factory) -> Path:
    from engine.data.prepare import WriterSettings, prepare

    out = tmp_path_factory.mktemp("jpeg")
    prepare("imagefolder", str(photo_tree), out, progress=False, writer=WriterSettings(decode_size=0))
    return out


@pytest.fixture(scope="session")
def jpeg48_root(photo_tree, tmp_path_factory) -> Path:
    """The photos stored as JPEG at decode geometry 48 (``dbd prepare --decode-size 48``)."""
    from engine.data.prepare import WriterSettings, prepare

    out = tmp_path_factory.mktemp("jpeg48")
    prepare("imagefolder", str(photo_tree), out, progress=False, writer=WriterSettings(decode_size=48))
    return out


@pytest.fixture(scope="session")
def raw_var_root(photo_tree, tmp_path_factory) -> Path:
    """Variable-size images written raw: the decoder reads the memory-mapped file."""
    from engine.data.prepare import WriterSettings, prepare

    out = tmp_path_factory.mktemp("rawvar")
    prepare("imagefolder", str(photo_tree), out, progress=False, writer=WriterSettings(write_mode="raw", decode_size=0))
    return out

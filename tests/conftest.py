"""Session fixtures shared by every test folder."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from engine.data.prepare import prepare

    out = tmp_path_factory.mktemp("digits")
    prepare("digits", None, out, progress=False)
    return out


@pytest.fixture(scope="session")
def color_root(tmp_path_factory) -> Path:
    """A tiny CIFAR-format dataset of stripe patterns (tests.builders.write_pattern_cifar),
    prepared: 200 training and 40 test images."""
    from engine.data.prepare import prepare
    from tests.builders import write_pattern_cifar

    base = tmp_path_factory.mktemp("pattern")
    folder = write_pattern_cifar(base / "src")
    out = base / "beton"
    prepare("cifar10", str(folder), out, progress=False)
    return out

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

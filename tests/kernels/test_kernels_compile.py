"""The Triton kernels lower to an sm_90 cubin (no GPU needed; see kernels_aot.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _ptxas() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return p if p.exists() else None


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its bundled NVIDIA ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parents[1]), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache  # a cold compile every time, not a cached success
        res = subprocess.run([sys.executable, str(HERE / "kernels_aot.py")], env=env, capture_output=True,
                             text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert res.stdout.count(" ok") == 14

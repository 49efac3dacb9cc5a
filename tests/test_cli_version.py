"""``dbd --version``: the engine's version and commit, and the libraries that make a figure."""
from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def test_version_names_the_engine_commit_and_libraries():
    r = subprocess.run([sys.executable, "-m", "engine", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    first, second = r.stdout.strip().splitlines()
    assert first.startswith(f"dbd-engine {metadata.version('dbd-engine')} (commit {head}")
    assert f"torch {torch.__version__}" in second
    assert f"ffcv {metadata.version('ffcv')}" in second and f"deepspeed {metadata.version('deepspeed')}" in second

"""The PyTorch twin's whole-batch mode (its mode on CUDA, where it is the fallback) makes
no host sync and copies no host-made tensor per call; counted on CPU by call name, as
engine.runtime.host_sync.HostSyncCounter does for the stages' steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from kernels_testutil import covering_simclr_params, random_images
from torch.overrides import TorchFunctionMode

from engine.runtime.host_sync import HostSyncCounter
from kernels import (
    SimCLRSpec,
    WeakSpec,
    make_generator,
    sample_weak_params,
    simclr_views,
    simclr_views_stacked,
    torch_path,
    weak_view,
)

KERNELS = str(Path(torch_path.__file__).resolve().parent) + "/"
# hue, per-sample blur and grayscale on; the RandomResizedCrop weak view; the pad-crop weak view.
SIMCLR = SimCLRSpec(size=16)
RRC = SimCLRSpec(size=16, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
WEAK = WeakSpec(size=16, padding=2)


def _all_views(images, replay, weak_replay):
    """Every torch-path entry point, with params replayed and with params sampled on the device."""
    g = make_generator(5, 1, 2, 0, images.device)
    simclr_views_stacked(images, SIMCLR, params=replay, impl="torch")
    simclr_views_stacked(images, SIMCLR, generator=g, impl="torch")
    simclr_views(images, SIMCLR, params=replay, impl="torch", dtype=torch.bfloat16)
    simclr_views(images, SIMCLR, generator=g, impl="torch")
    simclr_views(images, RRC, n_views=1, params=replay[:1], impl="torch")
    simclr_views(images, RRC, n_views=1, generator=g, impl="torch")
    weak_view(images, WEAK, params=weak_replay, impl="torch")
    weak_view(images, WEAK, generator=g, impl="torch")


@pytest.fixture
def batch():
    images = random_images(8, 20, 24, seed=30)
    replay = [covering_simclr_params(8, 20, 24, SIMCLR, seed=s) for s in (31, 32)]
    weak_replay = sample_weak_params(8, 20, 24, WEAK, make_generator(33, 0, 0, 0))
    return images, replay, weak_replay


def test_whole_batch_twin_makes_no_host_syncs(batch, monkeypatch):
    monkeypatch.setattr(torch_path, "GROUPED", False)
    with HostSyncCounter() as c:
        _all_views(*batch)
    assert c.calls == [], c.summary()


def test_grouped_twin_syncs_are_seen(batch, monkeypatch):
    # The control: the grouped (CPU) mode picks the hue and blur samples with .nonzero() and
    # reads the widest kernel back with int(). If the counter missed those, the test above
    # would pass whatever the whole-batch mode did.
    monkeypatch.setattr(torch_path, "GROUPED", True)
    images, replay, _ = batch
    with HostSyncCounter() as c:
        simclr_views_stacked(images, SIMCLR, params=replay, impl="torch")
    whats = {s.what for s in c.calls}
    assert {"nonzero", "__int__"} <= whats, c.summary()


class _HostTensors(TorchFunctionMode):
    """Records torch.tensor / as_tensor calls made by kernels/ code: on CUDA each is a copy
    from pageable host memory that the host waits for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tensor", "as_tensor"):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(KERNELS):
                self.calls.append(f"{name} @ {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))


def test_whole_batch_twin_makes_no_host_tensors_per_call(batch, monkeypatch):
    monkeypatch.setattr(torch_path, "GROUPED", False)
    _all_views(*batch)  # the first call per device may build the cached constants
    with _HostTensors() as m:
        _all_views(*batch)
    assert m.calls == []
    # The recorder does see such calls (a cold cache builds its constants with torch.tensor).
    torch_path._constant.cache_clear()
    with _HostTensors() as m:
        weak_view(batch[0], WEAK, params=batch[2], impl="torch")
    assert len(m.calls) == 2, m.calls

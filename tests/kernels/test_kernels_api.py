"""Public API: shapes, layouts, dtypes, implementation choice, reproducibility, input errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from kernels_testutil import random_images

from kernels import (
    SimCLRSpec,
    WeakSpec,
    make_generator,
    normalize,
    sample_simclr_params,
    simclr_views,
    simclr_views_stacked,
    torch_path,
    weak_view,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_simclr_output_contract(dtype):
    images = random_images(5, 36, 30)
    views, params = simclr_views(images, SimCLRSpec(size=16), n_views=3, seed=1, dtype=dtype)
    assert len(views) == len(params) == 3
    for v in views:
        assert v.shape == (5, 3, 16, 16) and v.dtype == dtype
        assert v.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(v.float()).all()
    assert not torch.equal(views[0], views[1])


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stacked_views_are_the_concatenated_views(dtype, grouped, monkeypatch):
    # Both torch-path modes; the Triton side is in test_kernels_triton.py. Three views of an
    # odd batch so that a view-major vs sample-major mix-up cannot line up by chance.
    monkeypatch.setattr(torch_path, "GROUPED", grouped)
    images = random_images(5, 36, 30, seed=2)
    spec = SimCLRSpec(size=16)
    views, params = simclr_views(images, spec, n_views=3, seed=4, step=1, dtype=dtype, impl="torch")
    stacked, sparams = simclr_views_stacked(images, spec, n_views=3, seed=4, step=1, dtype=dtype, impl="torch")
    assert stacked.shape == (15, 3, 16, 16) and stacked.dtype == dtype
    assert stacked.is_contiguous(memory_format=torch.channels_last)
    # One buffer of exactly the batch: the rows are written in place, not concatenated.
    assert stacked.untyped_storage().nbytes() == stacked.numel() * stacked.element_size()
    assert torch.equal(stacked, torch.cat(views))
    for a, b in zip(params, sparams):
        assert all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    # Replayed params give the same buffer; so does auto (the torch path on CPU).
    again, _ = simclr_views_stacked(images, spec, params=sparams, dtype=dtype)
    assert torch.equal(again, stacked)


def test_stacked_views_validate_like_views():
    images = random_images(2, 32, 32)
    with pytest.raises(ValueError, match="n_views"):
        simclr_views_stacked(images, n_views=0)
    with pytest.raises(TypeError, match="output dtype"):
        simclr_views_stacked(images, dtype=torch.float64)
    with pytest.raises(ValueError, match="params are for 3 samples"):
        simclr_views_stacked(images, params=[sample_simclr_params(3, 32, 32, SimCLRSpec(), None)])


def test_seed_kwargs_reproduce_and_differ_by_step():
    images = random_images(6, 32, 32)
    a, pa = simclr_views(images, seed=3, epoch=1, step=2, rank=0)
    b, _ = simclr_views(images, seed=3, epoch=1, step=2, rank=0)
    c, _ = simclr_views(images, seed=3, epoch=1, step=3, rank=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # seed kwargs are make_generator(seed, epoch, step, rank) on the images' device.
    g = make_generator(3, 1, 2, 0, "cpu")
    assert torch.equal(sample_simclr_params(6, 32, 32, SimCLRSpec(), g).sigma, pa[0].sigma)


def test_auto_impl_on_cpu_is_torch_path_and_replay():
    images = random_images(4, 32, 32)
    auto, params = simclr_views(images, generator=make_generator(0, 0, 0, 0, "cpu"))
    torch_views, _ = simclr_views(images, params=params, impl="torch")
    assert all(torch.equal(x, y) for x, y in zip(auto, torch_views))


def test_weak_and_normalize_contract():
    images = random_images(3, 32, 32)
    v, p = weak_view(images, WeakSpec(), seed=0, dtype=torch.bfloat16)
    assert v.shape == (3, 3, 32, 32) and v.dtype == torch.bfloat16
    assert v.is_contiguous(memory_format=torch.channels_last) and len(p) == 3
    n = normalize(images[:, :20, :28], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert n.shape == (3, 3, 20, 28) and n.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "images,exc,match",
    [
        (torch.zeros(2, 32, 32, 3), TypeError, "uint8"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ValueError, r"\(B, H, W, 3\)"),
        (torch.zeros(32, 32, 3, dtype=torch.uint8), ValueError, r"\(B, H, W, 3\)"),
        (torch.zeros(2, 32, 32, 4, dtype=torch.uint8), ValueError, r"\(B, H, W, 3\)"),
        (torch.zeros(0, 32, 32, 3, dtype=torch.uint8), ValueError, "empty batch"),
        (torch.zeros(2, 0, 32, 3, dtype=torch.uint8), ValueError, "empty spatial"),
        ([[0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(images, exc, match):
    with pytest.raises(exc, match=match):
        simclr_views(images)
    with pytest.raises(exc, match=match):
        weak_view(images)
    with pytest.raises(exc, match=match):
        normalize(images, (0.5,) * 3, (0.5,) * 3)


def test_bad_arguments():
    images = random_images(2, 32, 32)
    with pytest.raises(TypeError, match="output dtype"):
        simclr_views(images, dtype=torch.float64)
    with pytest.raises(ValueError, match="impl"):
        simclr_views(images, impl="cuda")
    with pytest.raises(ValueError, match="either generator or seed"):
        simclr_views(images, generator=make_generator(0, 0, 0, 0, "cpu"), seed=0)
    with pytest.raises(ValueError, match="n_views"):
        simclr_views(images, n_views=0)
    with pytest.raises(ValueError, match="params are for 3 samples"):
        simclr_views(images, params=[sample_simclr_params(3, 32, 32, SimCLRSpec(), None)])
    with pytest.raises(TypeError, match="SimCLRSpec"):
        simclr_views(images, WeakSpec())
    with pytest.raises(ValueError, match="std"):
        normalize(images, (0.5,) * 3, (0.5, 0.0, 0.5))


def test_weak_input_too_small():
    with pytest.raises(ValueError, match="smaller than the crop size 32"):
        weak_view(random_images(2, 20, 32), WeakSpec(size=32, padding=4))
    with pytest.raises(ValueError, match="reflect padding 4"):
        weak_view(random_images(2, 4, 4), WeakSpec(size=8, padding=4))
    # Symmetric padding may reach exactly the image size; constant padding has no limit.
    weak_view(random_images(2, 4, 4), WeakSpec(size=8, padding=4, padding_mode="symmetric"))
    weak_view(random_images(2, 2, 2), WeakSpec(size=8, padding=4, padding_mode="constant"))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(size=0), "size"),
        (dict(scale=(0.5, 0.2)), "scale"),
        (dict(ratio=(0.0, 1.0)), "ratio"),
        (dict(interpolation="nearest"), "interpolation"),
        (dict(flip_p=1.5), "flip_p"),
        (dict(hue=0.6), "hue"),
        (dict(contrast=-0.1), "contrast"),
        (dict(blur_kernel_size=4), "odd"),
        (dict(blur_kernel_size=-1), "0 \\(per-sample"),
        (dict(blur_sigma=(0.0, 1.0)), "blur_sigma"),
        (dict(size=3, blur_kernel_size=7), "too large"),
        (dict(std=(0.2, 0.0, 0.2)), "std"),
    ],
)
def test_spec_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SimCLRSpec(**kw)


def test_weak_spec_validation():
    with pytest.raises(ValueError, match="padding_mode"):
        WeakSpec(padding_mode="wrap")
    with pytest.raises(ValueError, match="padding"):
        WeakSpec(padding=-1)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_imports_without_triton_engine_or_ffcv():
    # `sys.modules[name] = None` makes any import of that name fail, as if not installed.
    res = _run(
        """
        import sys
        sys.modules["triton"] = None
        import torch, kernels
        images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
        views, _ = kernels.simclr_views(images, seed=0)
        kernels.weak_view(images, seed=0)
        assert views[0].shape == (2, 3, 32, 32)
        assert not kernels.triton_available()
        try:
            kernels.simclr_views(images, seed=0, impl="triton")
        except RuntimeError as e:
            assert "triton" in str(e)
        else:
            raise AssertionError("impl='triton' without triton must fail")
        bad = [m for m in sys.modules if m.split(".")[0] in ("engine", "ffcv")]
        assert not bad, bad
        print("ok")
        """
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]

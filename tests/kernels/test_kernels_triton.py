"""Triton kernels against the PyTorch path.

With a GPU the kernels are compiled and run on it. Without one they run on CPU tensors
through TRITON_INTERPRET=1, which executes them element by element in NumPy, so sizes stay
tiny and odd (9x11 sources, 7x7 views) and the batch is just large enough for
covering_simclr_params to put contrast and hue at every position of the jitter order.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

# Triton decides interpreted vs compiled when a function is decorated, i.e. when triton
# (whose standard library is itself jitted) and the kernel modules are first imported:
# the variable has to be set before that, and stay set.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# On CPU the interpreted checks always run in a fresh process that has TRITON_INTERPRET=1
# from its start (test_interpreter_suite_in_subprocess). Two reasons: triton may already
# have been imported uninterpreted in this process, and in a long session the garbage of
# earlier tests (numba dispatchers whose finalizers raise during collection) can hit the
# interpreter's ast parsing, where CPython 3.11 then reports "AST constructor recursion
# depth mismatch" (CPython gh-106905).
CHILD_FLAG = "DBD_TRITON_INTERPRETED_RUN"
IN_SUBPROCESS = HAVE_TRITON and DEVICE == "cpu" and os.environ.get(CHILD_FLAG) != "1"

from kernels_testutil import covering_simclr_params, random_images, unnormalise  # noqa: E402

from kernels import (  # noqa: E402
    SimCLRSpec,
    WeakSpec,
    normalize,
    simclr_views,
    simclr_views_stacked,
    tolerances,
    torch_path,
    weak_view,
)

RUN_HERE = HAVE_TRITON and not IN_SUBPROCESS
if RUN_HERE:
    from kernels import triton_simclr

here = pytest.mark.skipif(not RUN_HERE, reason="on CPU these run in test_interpreter_suite_in_subprocess")


@pytest.mark.skipif(not IN_SUBPROCESS, reason="runs the interpreted checks; this process is already that run")
def test_interpreter_suite_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1", CHILD_FLAG: "1"}
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


# On [0, 1] pixels after un-normalising (kernels/tolerances.py, which the GPU check reads too).
TOL = tolerances.simclr_by_dtype()


def _check_simclr(images, spec, params, dtype, block=None):
    """Fused views on DEVICE against the PyTorch path on CPU, on un-normalised pixels."""
    views = triton_simclr.simclr_views(images.to(DEVICE), spec, [p.to(DEVICE) for p in params], dtype, block=block)
    assert len(views) == len(params)
    for v, p in zip(views, params):
        assert v.dtype == dtype and v.shape == (images.shape[0], 3, spec.size, spec.size)
        assert v.is_contiguous(memory_format=torch.channels_last)
        ref = torch_path.simclr_unnormalised(images, spec, p).permute(0, 3, 1, 2)
        torch.testing.assert_close(unnormalise(v.cpu(), spec.mean, spec.std), ref, atol=TOL[dtype], rtol=0)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_simclr_single_tile(interpolation, dtype):
    spec = SimCLRSpec(size=7, interpolation=interpolation)
    images = random_images(8, 9, 11, seed=1)
    params = [covering_simclr_params(8, 9, 11, spec, seed=s) for s in (2, 3)]
    _check_simclr(images, spec, params, dtype)


@here
@pytest.mark.parametrize("interpolation,hue", [("bicubic", 0.1), ("bilinear", 0.1), ("bicubic", 0.0)])
def test_simclr_tile_axis_and_contrast_prepass(interpolation, hue):
    # block=16 splits the 49 pixels into 4 tiles, one program each: the contrast mean then
    # comes from the pre-pass's tile sums (with hue before contrast in some of the orders, or
    # compiled without hue), and tile edges cut through rows; the fixed K=5 blur reaches 2
    # rows across (the default per-sample kernels run in test_simclr_single_tile).
    spec = SimCLRSpec(size=7, interpolation=interpolation, blur_kernel_size=5, hue=hue)
    images = random_images(8, 9, 11, seed=4)
    params = [covering_simclr_params(8, 9, 11, spec, seed=5)]
    _check_simclr(images, spec, params, torch.float32, block=16)


@here
@pytest.mark.parametrize("kernel_size", [0, 7])
def test_blur_per_sample_and_fixed_kernels(kernel_size):
    # Every sample blurred, with radii 1..6 (per sample) against the 9 taps (radius 4 = size - 1)
    # the kernel unrolls at size 5: the widest ones are capped by the image, the narrow ones
    # have zero weights and masked loads over most taps; 2 tiles of 16 cut through rows.
    # kernel_size 7 is torchvision's fixed kernel (radius 3) for every sample.
    spec = SimCLRSpec(size=5, blur_kernel_size=kernel_size, blur_p=1.0)
    assert spec.blur_radius == (4 if kernel_size == 0 else 3)
    images = random_images(6, 9, 11, seed=13)
    p = covering_simclr_params(6, 9, 11, spec, seed=14)
    p = replace(p, blur=torch.ones(6, dtype=torch.bool),
                sigma=torch.tensor([0.1, 0.34, 0.9, 1.2, 1.6, 2.0], dtype=torch.float32))
    _check_simclr(images, spec, [p], torch.float32, block=16)


@here
def test_simclr_non_contiguous_source_and_disabled_ops():
    # Strided input (a column slice) and a spec without hue/blur/contrast take the other branches.
    spec = SimCLRSpec(size=7, hue=0.0, blur_p=0.0, contrast=0.0)
    images = random_images(6, 9, 13, seed=6)[:, :, 1:12]
    assert not images.is_contiguous()
    params = [covering_simclr_params(6, 9, 11, spec, seed=7)]
    _check_simclr(images, spec, params, torch.float32)


@here
@pytest.mark.parametrize("block", [None, 16])
def test_simclr_ops_disabled_by_spec(block):
    # Replayed flags for ops the spec turns off must be ignored exactly as by the torch path.
    # jitter_p = 0 with hue > 0, as the RandomResizedCrop weak view: compiled without jitter
    # and HSV code, in one tile and on the tile axis (no pre-pass then).
    spec = SimCLRSpec(size=7, jitter_p=0.0, grayscale_p=0.0, interpolation="bilinear")
    assert spec.hue > 0
    images = random_images(4, 9, 11, seed=11)
    params = [covering_simclr_params(4, 9, 11, spec, seed=12)]
    _check_simclr(images, spec, params, torch.float32, block=block)


@here
@pytest.mark.parametrize("block,blur_p", [(None, 0.5), (32, 0.0)])
def test_stacked_buffer(block, blur_p):
    # One launch buffer, view-major: equal bit for bit to the per-view list of a second launch
    # concatenated (so also deterministic: the pre-pass writes tile sums, no atomics), close
    # to the torch path. In one tile with the blur passes, and on the tile axis with the
    # pre-pass (blur off there to keep the interpreter quick; tiled blur runs above).
    spec = SimCLRSpec(size=7, blur_p=blur_p)
    images = random_images(5, 9, 11, seed=15).to(DEVICE)
    params = [covering_simclr_params(5, 9, 11, spec, seed=s).to(DEVICE) for s in (16, 17)]
    stacked = triton_simclr.simclr_views_stacked(images, spec, params, torch.float32, block=block)
    assert stacked.shape == (10, 3, 7, 7) and stacked.is_contiguous(memory_format=torch.channels_last)
    views = triton_simclr.simclr_views(images, spec, params, torch.float32, block=block)
    # The list is row blocks of one buffer: no copy either.
    assert views[1].untyped_storage().data_ptr() == views[0].untyped_storage().data_ptr()
    assert torch.equal(torch.cat(views), stacked)
    ref = torch.cat([torch_path.simclr_view(images.cpu(), spec, p.to("cpu")) for p in params])
    torch.testing.assert_close(unnormalise(stacked.cpu(), spec.mean, spec.std), unnormalise(ref, spec.mean, spec.std),
                               atol=TOL[torch.float32], rtol=0)


@here
def test_dispatch_triton_impl():
    spec = SimCLRSpec(size=7)
    images = random_images(3, 9, 11, seed=8)
    fused, params = simclr_views(images.to(DEVICE), spec, seed=1, impl="triton")
    plain, _ = simclr_views(images, spec, params=[p.to("cpu") for p in params], impl="torch")
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.cpu(), b, atol=5e-4, rtol=0)
    # The stacked entry point: the same params give the list concatenated, in bf16 too.
    for dtype in (torch.float32, torch.bfloat16):
        stacked, _ = simclr_views_stacked(images.to(DEVICE), spec, params=params, dtype=dtype, impl="triton")
        views, _ = simclr_views(images.to(DEVICE), spec, params=params, dtype=dtype, impl="triton")
        assert stacked.dtype == dtype and torch.equal(stacked, torch.cat(views))
    torch.testing.assert_close(stacked.cpu().float(), torch.cat(plain), atol=3e-2, rtol=0)


@here
@pytest.mark.parametrize("mode", ["reflect", "symmetric", "edge", "constant"])
def test_weak(mode):
    spec = WeakSpec(size=7, padding=3, padding_mode=mode)
    images = random_images(4, 9, 11, seed=9)
    ref, params = weak_view(images, spec, seed=3, impl="torch")
    got, _ = weak_view(images.to(DEVICE), spec, params=params.to(DEVICE), impl="triton")
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got.cpu(), ref, atol=tolerances.WEAK, rtol=0)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize(dtype):
    images = random_images(2, 9, 11, seed=10)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.25)
    got = normalize(images.to(DEVICE), mean, std, dtype=dtype, impl="triton")
    ref = normalize(images, mean, std, dtype=torch.float32, impl="torch")
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(unnormalise(got.cpu(), mean, std), unnormalise(ref, mean, std), atol=TOL[dtype], rtol=0)

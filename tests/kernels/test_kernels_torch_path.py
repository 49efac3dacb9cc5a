"""The vectorised PyTorch path against torchvision v2 applied sample by sample."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as F
from kernels_testutil import covering_simclr_params, random_images, torchvision_simclr, unnormalise

from kernels import SimCLRSpec, WeakSpec, normalize, simclr_views, torch_path, weak_view

# Reached with fp32 reductions in a different order than torchvision's; a wrong tap,
# weight, order or clamp shows up at 1e-2 or more.
ATOL = 2e-5

CASES = [
    # (H, W, spec kwargs): odd sizes, non-square sources, upsampling and downsampling crops.
    # Default specs blur each sample with its own 2*ceil(3*sigma)+1 taps (up to 13 at sigma 2,
    # radius 6 = size - 1 at size 7); size 4 caps the radius at 3; the 5s are fixed kernels.
    (9, 11, dict(size=7)),
    (32, 32, dict()),
    (9, 11, dict(size=4)),
    (40, 23, dict(size=16, blur_kernel_size=5)),
    (9, 11, dict(size=7, interpolation="bilinear")),
    (40, 23, dict(size=16, interpolation="bilinear", blur_kernel_size=5, hue=0.0, brightness=0.0)),
]


@pytest.mark.parametrize("h,w,kw", CASES)
def test_simclr_matches_torchvision(h, w, kw):
    spec = SimCLRSpec(**kw)
    b = 24
    images = random_images(b, h, w, seed=h * w)
    params = covering_simclr_params(b, h, w, spec, seed=h + w)
    got = torch_path.simclr_unnormalised(images, spec, params)
    ref = torch.stack([torchvision_simclr(images[i], spec, params, i) for i in range(b)])
    torch.testing.assert_close(got.permute(0, 3, 1, 2), ref, atol=ATOL, rtol=0)


def test_identity_sized_crop_is_exact():
    # torchvision skips interpolation when the crop already has the output size; the tap
    # weights must then be exactly (0, 1, 0, 0), so the crop comes through bit for bit.
    spec = SimCLRSpec(size=7, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.0)
    images = random_images(4, 9, 11)
    params = covering_simclr_params(4, 9, 11, spec)
    params = replace(
        params,
        top=torch.tensor([0, 1, 2, 2]),
        left=torch.tensor([0, 4, 2, 1]),
        height=torch.full((4,), 7),
        width=torch.full((4,), 7),
        flip=torch.zeros(4, dtype=torch.bool),
        jitter=torch.zeros(4, dtype=torch.bool),
        grayscale=torch.zeros(4, dtype=torch.bool),
        blur=torch.zeros(4, dtype=torch.bool),
    )
    got = torch_path.simclr_unnormalised(images, spec, params)
    for i in range(4):
        t, left = int(params.top[i]), int(params.left[i])
        want = F.to_dtype(images[i, t : t + 7, left : left + 7], torch.float32, scale=True)
        assert torch.equal(got[i], want)


def test_simclr_normalisation_layout_and_dtypes():
    spec = SimCLRSpec(size=7)
    images = random_images(24, 9, 11, seed=3)
    params = covering_simclr_params(24, 9, 11, spec)
    ref = torch.stack([torchvision_simclr(images[i], spec, params, i) for i in range(24)])
    ref = F.normalize(ref, list(spec.mean), list(spec.std))
    for dtype, atol in ((torch.float32, 1e-4), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)):
        views, _ = simclr_views(images, spec, params=[params], dtype=dtype, impl="torch")
        v = views[0]
        assert v.shape == (24, 3, 7, 7) and v.dtype == dtype
        assert v.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(v.float(), ref, atol=atol, rtol=0)


def test_views_are_independent_and_unclamped_bicubic_differs():
    # Two views draw separate parameters; and the clamp after resize is a real choice: on a
    # high-contrast image torchvision's float bicubic overshoots [0, 1] without it.
    images = torch.zeros(8, 12, 12, 3, dtype=torch.uint8)
    images[:, :, 6:] = 255
    spec = SimCLRSpec(size=24, jitter_p=0, grayscale_p=0, blur_p=0, flip_p=0, scale=(0.5, 0.5))
    views, params = simclr_views(images, spec, seed=0, impl="torch")
    assert not torch.equal(params[0].top, params[1].top) or not torch.equal(params[0].left, params[1].left)
    raw = T.RandomResizedCrop(24, interpolation=T.InterpolationMode.BICUBIC, antialias=False).transform(
        F.to_dtype(images[0].permute(2, 0, 1), torch.float32, scale=True),
        dict(top=int(params[0].top[0]), left=int(params[0].left[0]), height=int(params[0].height[0]),
             width=int(params[0].width[0])),
    )
    un = unnormalise(views[0][:1], spec.mean, spec.std)
    assert raw.max() > 1.0 or raw.min() < 0.0
    assert un.max() <= 1.0 + 1e-5 and un.min() >= -1e-5


@pytest.mark.parametrize("mode", ["reflect", "constant", "edge", "symmetric"])
def test_weak_matches_torchvision(mode):
    spec = WeakSpec(size=7, padding=3, padding_mode=mode)
    images = random_images(16, 9, 11, seed=5)
    view, p = weak_view(images, spec, seed=7, impl="torch")
    crop = T.RandomCrop(7, padding=3, padding_mode=mode)
    for i in range(16):
        x = F.to_dtype(images[i].permute(2, 0, 1), torch.float32, scale=True)
        # RandomCrop pads with its padding_mode, then crops at the (padded-frame) offsets.
        x = crop.transform(x, dict(needs_pad=True, padding=[3, 3, 3, 3], needs_crop=True,
                                   top=int(p.top[i]), left=int(p.left[i]), height=7, width=7))
        if p.flip[i]:
            x = F.horizontal_flip(x)
        x = F.normalize(x, list(spec.mean), list(spec.std))
        torch.testing.assert_close(view[i], x, atol=1e-6, rtol=0)
    assert view.is_contiguous(memory_format=torch.channels_last)
    assert p.flip.any() and (~p.flip).any()


def test_weak_default_is_cifar_random_crop():
    spec = WeakSpec()
    images = random_images(64, 32, 32, seed=1)
    view, p = weak_view(images, spec, seed=2, impl="torch")
    assert view.shape == (64, 3, 32, 32)
    assert int(p.top.min()) >= 0 and int(p.top.max()) <= 8 and int(p.left.max()) <= 8
    # Offset (4, 4) without flip is the identity crop of the unpadded image.
    i = ((p.top == 4) & (p.left == 4) & ~p.flip).nonzero()
    for k in i.flatten().tolist():
        torch.testing.assert_close(unnormalise(view[k : k + 1], spec.mean, spec.std)[0],
                                   F.to_dtype(images[k].permute(2, 0, 1), torch.float32, scale=True),
                                   atol=1e-6, rtol=0)


def test_normalize_matches_torchvision():
    images = random_images(5, 9, 11, seed=9)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    got = normalize(images, mean, std, impl="torch")
    ref = F.normalize(F.to_dtype(images.permute(0, 3, 1, 2), torch.float32, scale=True), list(mean), list(std))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert got.is_contiguous(memory_format=torch.channels_last)
    half = normalize(images, mean, std, dtype=torch.bfloat16, impl="torch")
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), ref, atol=2e-2, rtol=0)


def test_sample_groups_and_resample_chunks_do_not_change_results(monkeypatch):
    # Large batches run the chain in groups of samples and the resample in chunks; force
    # both to split this small batch unevenly and compare with the single-pass result.
    spec = SimCLRSpec(size=7)
    images = random_images(24, 9, 11, seed=12)
    params = covering_simclr_params(24, 9, 11, spec, seed=13)
    whole = torch_path.simclr_unnormalised(images, spec, params)
    monkeypatch.setattr(torch_path, "_GROUP_ELEMS", 7 * 7 * 3 * 5)
    monkeypatch.setattr(torch_path, "_CHUNK_ELEMS", 7 * 11 * 3 * 2)
    split = torch_path.simclr_unnormalised(images, spec, params)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=0)


def test_ops_disabled_by_spec_ignore_replayed_flags():
    # The weak RandomResizedCrop view is a SimCLR spec with every colour op at p = 0; params
    # replayed into it (flags set) must still give crop + resize + flip only.
    spec = SimCLRSpec(size=7, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    images = random_images(8, 9, 11, seed=14)
    params = covering_simclr_params(8, 9, 11, spec, seed=15)
    assert params.jitter.any() and params.grayscale.any() and params.blur.any()
    got = torch_path.simclr_unnormalised(images, spec, params)
    bare = replace(params, jitter=params.jitter & False, grayscale=params.grayscale & False,
                   blur=params.blur & False)
    ref = torch.stack([torchvision_simclr(images[i], spec, bare, i) for i in range(8)])
    torch.testing.assert_close(got.permute(0, 3, 1, 2), ref, atol=ATOL, rtol=0)


# Whole-batch mode (the CUDA fallback) against grouped mode (CPU). Specs: hue on with the
# per-sample blur (radii 1..6 at size 7, so the whole batch's 13 taps exceed most groups'
# widest kernel), hue off with bilinear and grayscale, a fixed 5-tap blur on every sample,
# and the RandomResizedCrop weak view (every colour op off).
MODE_SPECS = [
    dict(size=7),
    dict(size=7, hue=0.0, interpolation="bilinear", grayscale_p=0.5),
    dict(size=16, blur_kernel_size=5, blur_p=1.0),
    dict(size=7, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0),
]


@pytest.mark.parametrize("kw", MODE_SPECS)
def test_whole_batch_mode_equals_grouped(kw, monkeypatch):
    spec = SimCLRSpec(**kw)
    images = random_images(24, 40, 23, seed=21)
    params = covering_simclr_params(24, 40, 23, spec, seed=22)
    if kw.get("blur_p") == 1.0:
        params = replace(params, blur=torch.ones(24, dtype=torch.bool))
    assert params.blur.any() and params.jitter.any() and params.grayscale.any()
    # Groups of 5 samples: the grouped mode then really groups, and picks hue and blur samples per group.
    monkeypatch.setattr(torch_path, "_GROUP_ELEMS", spec.size * spec.size * 3 * 5)
    grouped = torch_path.simclr_unnormalised(images, spec, params, grouped=True)
    whole = torch_path.simclr_unnormalised(images, spec, params, grouped=False)
    torch.testing.assert_close(whole, grouped, atol=1e-6, rtol=0)
    # And through the normalisation, in a half type, as the public API returns it.
    a = torch_path.simclr_view(images, spec, params, torch.bfloat16, grouped=True)
    b = torch_path.simclr_view(images, spec, params, torch.bfloat16, grouped=False)
    assert b.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b.float(), a.float(), atol=1e-2, rtol=0)


def test_whole_batch_mode_ignores_what_is_not_selected():
    # Unselected samples may carry sigma 0 (NaN kernels) or huge hue shifts: the whole-batch
    # mode computes blur and hue for them too and must drop the results, not blend them in.
    spec = SimCLRSpec(size=7)
    images = random_images(8, 9, 11, seed=23)
    params = covering_simclr_params(8, 9, 11, spec, seed=24)
    odd = replace(params, sigma=torch.where(params.blur, params.sigma, torch.zeros(8)),
                  hue=torch.where(params.jitter, params.hue, torch.full((8,), 0.5)))
    whole = torch_path.simclr_unnormalised(images, spec, odd, grouped=False)
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(whole, torch_path.simclr_unnormalised(images, spec, params, grouped=True),
                               atol=1e-6, rtol=0)


def test_mode_switch(monkeypatch):
    cpu = torch.zeros(1, 1, 1, 3, dtype=torch.uint8)
    meta = torch.zeros(1, 1, 1, 3, dtype=torch.uint8, device="meta")  # any non-CPU device
    assert torch_path._is_grouped(cpu, None) and not torch_path._is_grouped(meta, None)
    assert not torch_path._is_grouped(cpu, False) and torch_path._is_grouped(meta, True)
    monkeypatch.setattr(torch_path, "GROUPED", False)
    assert not torch_path._is_grouped(cpu, None) and torch_path._is_grouped(cpu, True)

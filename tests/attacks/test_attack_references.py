"""The NumPy references against hand-built expectations, and the numba kernels against
the references on windows of assorted sizes (no FFCV involved)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from engine.attacks.triggers.badnets import BadNets, build_frame
from engine.attacks.base import nearest_index
from engine.attacks.triggers.blended import Blended
from engine.attacks.triggers.label_consistent import LabelConsistent
from engine.attacks.ops import compiled_kernel
from engine.attacks.triggers.sig import SIG
from engine.attacks.triggers.wanet import WaNet, warp_field
from engine.attacks.triggers.badnets import BadNetsConfig
from engine.attacks.triggers.wanet import WaNetConfig
from engine.errors import UserError

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
IDX = np.arange(100, 106)


def test_badnets_white3x3_replaces_exactly_the_bottom_right_square():
    out = BadNets.from_config(BadNetsConfig()).apply(IMAGES, IDX)
    assert (out[:, 29:32, 29:32] == 255).all()
    changed = np.zeros((32, 32, 3), bool)
    changed[29:32, 29:32] = True
    assert np.array_equal(out[:, ~changed], IMAGES[:, ~changed])


# The DBD reference's data/trigger/cifar_1.png: rows 4-5, columns 4-5, row-major.
DBD_CIFAR_TRIGGER = {(4, 4): (180, 249, 112), (4, 5): (155, 50, 126), (5, 4): (234, 82, 68), (5, 5): (187, 201, 219)}


def test_badnets_dbd2x2_is_the_reference_trigger_at_rows_4_5():
    out = BadNets.from_config(BadNetsConfig(pattern="dbd2x2")).apply(IMAGES, IDX)
    for (r, c), rgb in DBD_CIFAR_TRIGGER.items():
        assert (out[:, r, c] == np.array(rgb, np.uint8)).all()
    outside = np.ones((32, 32), bool)
    outside[4:6, 4:6] = False
    assert np.array_equal(out[:, outside], IMAGES[:, outside])


def test_badnets_pattern_scales_with_the_image():
    big = np.zeros((1, 64, 64, 3), np.uint8)
    out = BadNets.from_config(BadNetsConfig()).apply(big, np.array([0]))
    # 3 of 32 pixels -> 6 of 64, still flush with the bottom-right corner.
    assert (out[0, 58:, 58:] == 255).all() and out[0, :58].max() == 0 and out[0, :, :58].max() == 0


def test_badnets_patch_files_and_positions(tmp_path):
    from PIL import Image

    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 255  # only the top-left pixel is in the mask
    Image.fromarray(rgba, "RGBA").save(tmp_path / "p.png")
    pattern, mask = build_frame(str(tmp_path / "p.png"), 32, "top_left")
    assert mask.sum() == 3 and mask[0, 0].all() and (pattern[0, 0] == 200).all()
    pattern, mask = build_frame(str(tmp_path / "p.png"), 32, "10,20")
    assert mask[10, 20].all() and mask.sum() == 3
    np.savez(tmp_path / "p.npz", pattern=np.full((3, 3, 3), 9, np.uint8), mask=np.eye(3, dtype=bool))
    pattern, mask = build_frame(str(tmp_path / "p.npz"), 32, "")
    assert mask.sum() == 9 and mask[29, 29].all() and mask[31, 31].all() and not mask[29, 30].any()


@pytest.mark.parametrize("spec, position, message", [
    ("big", "", "larger than the image"),
    ("white3x3", "31,31", "does not fit"),
    ("white3x3", "middle", "position must be"),
    ("missing.png", "", "pattern file not found"),
    ("starburst", "", "unknown pattern"),
])
def test_badnets_bad_patterns_are_one_line_user_errors(tmp_path, spec, position, message):
    if spec == "big":
        from PIL import Image

        spec = str(tmp_path / "big.png")
        Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(spec)
    elif spec == "missing.png":
        spec = str(tmp_path / spec)
    with pytest.raises(UserError) as e:
        build_frame(spec, 32, position)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_blended_arithmetic_and_truncation():
    x = np.array([1, 3, 2, 200, 0, 255], np.uint8).reshape(1, 1, 6, 1).repeat(3, axis=3)
    t = np.array([0, 0, 1, 100, 255, 0], np.uint8).reshape(1, 6, 1).repeat(3, axis=2)
    out = Blended(t, 0.5).apply(x, np.array([0]))[0, 0, :, 0]
    # 0.5, 1.5, 1.5, 150, 127.5, 127.5, truncated like PIL's Image.blend (the DBD reference)
    assert out.tolist() == [0, 1, 1, 150, 127, 127]
    out = Blended(t, 0.1).apply(x, np.array([0]))[0, 0, :, 0]
    # 0.9, 2.7, 1.9, 190, 25.5, 229.5
    assert out.tolist() == [0, 2, 1, 190, 25, 229]
    assert np.array_equal(Blended(t, 0.0).apply(x, np.array([0])), x)
    assert np.array_equal(Blended(t, 1.0).apply(x, np.array([0]))[0], t)
    # Every (x, t) pair agrees with PIL's blend, which the DBD reference uses.
    from PIL import Image

    grid_x = np.repeat(np.arange(256, dtype=np.uint8), 256).reshape(256, 256, 1).repeat(3, axis=2)
    grid_t = np.ascontiguousarray(grid_x.transpose(1, 0, 2))
    for alpha in (0.1, 0.2, 0.37):
        pil = np.asarray(Image.blend(Image.fromarray(grid_x), Image.fromarray(grid_t), alpha))
        assert np.array_equal(Blended(grid_t, alpha).apply(grid_x[None], np.array([0]))[0], pil)


@pytest.mark.parametrize("alpha", [-0.1, 1.01])
def test_blended_alpha_outside_unit_interval(alpha):
    with pytest.raises(UserError, match="alpha"):
        Blended(np.zeros((4, 4, 3), np.uint8), alpha)


def test_sig_column_profile():
    flat = np.full((1, 5, 32, 3), 100, np.uint8)
    out = SIG(32, 40, 6).apply(flat, np.array([0])).astype(int)
    expected = 100 + np.floor(40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32))
    assert np.array_equal(out[0, 0, :, 0], expected)
    assert (out == out[:, :1]).all() and (out == out[..., :1]).all()  # rows and channels alike
    dark = SIG(32, 40, 6).apply(np.zeros((1, 2, 32, 3), np.uint8), np.array([0]))
    assert dark.min() == 0 and dark[0, 0, :, 0].tolist() == np.clip(expected - 100, 0, 255).tolist()


def test_wanet_is_the_identity_when_s_is_zero():
    w = WaNet.build(WaNetConfig(s=0.0, noise=False), (32, 32))
    assert not w.field.any()
    assert np.array_equal(w.apply(IMAGES, IDX), IMAGES)


def test_wanet_follows_grid_sample_within_one_level():
    import torch
    import torch.nn.functional as F

    cfg = WaNetConfig(s=1.0, noise=False)
    ours = WaNet.build(cfg, (32, 32)).apply(IMAGES, IDX).astype(float)
    ins = np.random.default_rng(cfg.grid_seed).uniform(-1, 1, size=(1, 2, cfg.k, cfg.k))
    ins = ins / np.mean(np.abs(ins))
    up = F.interpolate(torch.from_numpy(ins), size=(32, 32), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    a = torch.linspace(-1, 1, 32, dtype=torch.float64)
    x, y = torch.meshgrid(a, a, indexing="ij")
    grid = torch.clamp(torch.stack((y, x), 2)[None] + cfg.s * up / 32, -1, 1)
    ref = F.grid_sample(torch.from_numpy(IMAGES).permute(0, 3, 1, 2).double(), grid.expand(len(IMAGES), -1, -1, -1),
                        align_corners=True).permute(0, 2, 3, 1).numpy()
    diff = np.abs(ours - ref)
    assert diff.max() <= 1.5 and diff.mean() < 0.35
    assert np.abs(ours - IMAGES).max() > 20  # the warp is not a no-op


def test_wanet_noise_is_static_per_sample_and_only_where_planned():
    noise = np.zeros(200, bool)
    noise[[101, 103]] = True
    w = WaNet.build(WaNetConfig(), (32, 32), noise=noise, noise_seed=3)
    plain = w.without_noise().apply(IMAGES, IDX)
    a, b = w.apply(IMAGES, IDX), w.apply(IMAGES, IDX)
    assert np.array_equal(a, b)
    assert np.array_equal(a[[0, 2, 4, 5]], plain[[0, 2, 4, 5]])
    assert not np.array_equal(a[1], plain[1]) and not np.array_equal(a[3], plain[3])
    # The same image under two noise-mode indices gets two different jitters.
    same = np.repeat(IMAGES[:1], 2, axis=0)
    twice = w.apply(same, np.array([101, 103]))
    assert not np.array_equal(twice[0], twice[1])


# The original "all-corners" trigger as BackdoorBench's lc.py lists it: ((row, col), +1/-1)
# with negative indices from the far edge; +1 sets 255, -1 sets 0 (at full amplitude).
ALL_CORNERS = [
    ((0, 0), 1), ((0, 1), -1), ((0, 2), -1), ((1, 0), -1), ((1, 1), 1), ((1, 2), -1),
    ((2, 0), 1), ((2, 1), -1), ((2, 2), 1),
    ((-1, 0), 1), ((-1, 1), -1), ((-1, 2), 1), ((-2, 0), -1), ((-2, 1), 1), ((-2, 2), -1),
    ((-3, 0), 1), ((-3, 1), -1), ((-3, 2), -1),
    ((0, -1), 1), ((0, -2), -1), ((0, -3), -1), ((1, -1), -1), ((1, -2), 1), ((1, -3), -1),
    ((2, -1), 1), ((2, -2), -1), ((2, -3), 1),
    ((-1, -1), 1), ((-1, -2), -1), ((-1, -3), 1), ((-2, -1), -1), ((-2, -2), 1), ((-2, -3), -1),
    ((-3, -1), 1), ((-3, -2), -1), ((-3, -3), -1),
]


def test_label_consistent_corner_pattern_is_the_original_36_entries():
    for fill in (0, 128, 255):
        img = np.full((1, 32, 32, 3), fill, np.uint8)
        out = LabelConsistent().apply(img, np.array([0]))[0]
        want = img[0].astype(np.int64)
        for (r, c), v in ALL_CORNERS:
            want[r, c] = 255 if v > 0 else 0
        np.testing.assert_array_equal(out, want)
    # The four pixels the old copied checkerboard got wrong are 0 in the original.
    out = LabelConsistent().apply(np.zeros((1, 32, 32, 3), np.uint8), np.array([0]))[0, :, :, 0]
    assert all(out[r, c] == 0 for r, c in ((0, 2), (0, 29), (29, 2), (29, 29)))


def test_label_consistent_perturbation_under_the_trigger():
    top_left = np.array([[255, 0, 0], [0, 255, 0], [255, 0, 255]])
    delta = np.full((1, 32, 32, 3), 5, np.int8)
    rows = np.array([-1, 0], np.int32)
    mid = np.full((2, 32, 32, 3), 100, np.uint8)
    got = LabelConsistent(delta, rows).apply(mid, np.array([0, 1]))
    assert (got[0, 10:20, 10:20] == 100).all() and (got[1, 10:20, 10:20] == 105).all()
    assert np.array_equal(got[1, :3, :3, 0], top_left)  # the trigger goes over the perturbation


@functools.lru_cache(maxsize=1)
def _attacks():
    # One instance per attack for the whole module, so each kernel compiles once.
    frame = (24, 24)
    noise = np.zeros(300, bool)
    noise[5::3] = True
    rows = np.full(300, -1, np.int32)
    rows[::2] = np.arange(150)
    delta = np.random.default_rng(1).integers(-8, 9, size=(150, *frame, 3)).astype(np.int8)
    return {
        "badnets": BadNets.from_config(BadNetsConfig(pattern="dbd2x2")),
        "blended": Blended(np.random.default_rng(2).integers(0, 256, (*frame, 3), dtype=np.uint8), 0.2),
        "sig": SIG(frame[1], 40, 6),
        "wanet": WaNet(warp_field(frame, 4, 2.0, 1.0, 0), noise=noise, noise_seed=9),
        "label_consistent": LabelConsistent(delta, rows),
    }


@pytest.mark.parametrize("name", ["badnets", "blended", "sig", "wanet", "label_consistent"])
@pytest.mark.parametrize("size", [(24, 24), (45, 61), (7, 9), (96, 96)])
def test_kernel_equals_reference_on_any_window(name, size):
    attack = _attacks()[name]
    kernel = compiled_kernel(attack)
    imgs = np.random.default_rng(size[0]).integers(0, 256, size=(6, *size, 3), dtype=np.uint8)
    idx = np.array([0, 1, 5, 8, 11, 200])
    ref = attack.apply(imgs, idx)
    got = imgs.copy()
    for k in range(len(got)):
        kernel(got[k], idx[k])
    assert np.array_equal(got, ref)
    # A window inside a larger buffer (the JPEG decoder's case) is triggered in place.
    big = np.zeros((size[0] + 4, size[1] + 6, 3), np.uint8)
    big[2:-2, 3:-3] = imgs[2]
    kernel(big[2:-2, 3:-3], idx[2])
    assert np.array_equal(big[2:-2, 3:-3], ref[2]) and big[:2].max() == 0 and big[:, :3].max() == 0


def test_nearest_index_is_identity_at_equal_size_and_covers_the_frame():
    assert np.array_equal(nearest_index(32, 32), np.arange(32))
    up = nearest_index(224, 32)
    assert up[0] == 0 and up[-1] == 31 and np.all(np.bincount(up) == 7)

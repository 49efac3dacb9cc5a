"""The weak view's fill mode and resized-crop filter, from config to pixels, and the
no-defense presets set to the reference's augmentation (shared/reference/dbd.md:
BadNets RandomCrop(32, padding 4, zero fill) + flip; Blended RandomResizedCrop(32,
scale 0.2-1, bicubic) + flip). The kernels' own tests hold each mode against
torchvision; these check that the config reaches them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.settings import DataConfig, WeakViewConfig
from engine.stages.views import WeakAugment

REPO = Path(__file__).resolve().parents[2]


def _denormalised(augment: WeakAugment, images: torch.Tensor) -> torch.Tensor:
    out = augment(images, seed=0, epoch=0, step=0, rank=0)  # (N, 3, S, S) normalised
    mean = torch.tensor(augment.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(augment.data.std).view(1, 3, 1, 1)
    return (out * std + mean) * 255


def test_zero_fill_pads_with_black_and_reflect_never_does():
    data = DataConfig()
    white = torch.full((64, 32, 32, 3), 255, dtype=torch.uint8)
    zero = _denormalised(WeakAugment(data, WeakViewConfig(padding_mode="constant")), white)
    reflect = _denormalised(WeakAugment(data, WeakViewConfig(padding_mode="reflect")), white)
    # A crop offset away from (4, 4) brings padding into the frame: black there, and only
    # in whole rows or columns at the border.
    black = zero.amin(dim=1) < 0.5
    assert black.any(dim=(1, 2)).float().mean() > 0.5
    assert not black[:, 4:-4, 4:-4].any()
    assert torch.allclose(reflect, torch.full_like(reflect, 255.0), atol=1e-3)


def test_resized_crop_filter_reaches_the_view():
    data = DataConfig()
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    views = {}
    for filt in ("bilinear", "bicubic"):
        augment = WeakAugment(data, WeakViewConfig(kind="resized_crop", interpolation=filt))
        assert augment.spec.interpolation == filt
        views[filt] = augment(images, seed=0, epoch=0, step=0, rank=0)
    # Same seed, same crops: only the filter differs, and it changes the pixels.
    assert views["bilinear"].shape == views["bicubic"].shape
    assert (views["bilinear"] - views["bicubic"]).abs().max() > 0.05


def test_no_defense_presets_use_the_reference_augmentation():
    badnets = load_config(REPO / "configs/cifar10/badnets_none.yaml").supervised.view
    assert (badnets.kind, badnets.padding, badnets.padding_mode, badnets.flip_p) == ("pad_crop", 4, "constant", 0.5)
    blended = load_config(REPO / "configs/cifar10/blended_none.yaml").supervised.view
    assert (blended.kind, tuple(blended.scale), blended.interpolation, blended.flip_p) == \
        ("resized_crop", (0.2, 1.0), "bicubic", 0.5)
    # The defense's own weak views stay the reference's reflect-padded crop.
    dbd = load_config(REPO / "configs/cifar10/blended_dbd.yaml")
    assert dbd.linear.view.padding_mode == dbd.finetune.view.padding_mode == "reflect"
    assert (dbd.attack.blended.pattern.endswith("hello_kitty.png"), dbd.attack.blended.resample) == (True, "bicubic")


@pytest.mark.parametrize("override,key", [("supervised.view.padding_mode=zero", "supervised.view.padding_mode"),
                                          ("linear.view.interpolation=area", "linear.view.interpolation"),
                                          ("finetune.view.kind=crop", "finetune.view.kind")])
def test_bad_view_settings_name_the_key(override, key):
    from engine.errors import UserError

    with pytest.raises(UserError, match=key):
        load_config(REPO / "configs/demo/digits_badnets_dbd.yaml", [override])

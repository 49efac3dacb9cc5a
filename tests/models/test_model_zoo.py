"""The backbone registry and the two backbones of ABL and ASD's reference code.

The parameter counts are computed here from the architectures as their references define
them (bboylyg/ABL models/wresnet.py, SCLBD/BackdoorBench models/preact_resnet.py), layer by
layer, independently of engine/models; the counts at width 64 are also checked against the
published ones, so no reference implementation (torchvision or other) is needed.
"""
from __future__ import annotations

import pytest
import torch

from engine.errors import UserError
from engine.models import BACKBONES, Classifier, build_backbone

KNOWN = ("cifar_resnet18", "resnet18", "resnet50", "preact_resnet18", "wrn16_1")


def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k  # no bias


def bn(c: int) -> int:
    return 2 * c  # weight and bias


def wrn16_params(width: int) -> int:
    """WRN-16-k with groups of width/4, width/2, width channels and a 16-channel stem."""
    n = (16 - 4) // 6
    total = conv(3, 16, 3)
    cin = 16
    for cout in (width // 4, width // 2, width):
        for i in range(n):
            c = cin if i == 0 else cout
            total += bn(c) + conv(c, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if c != cout:
                total += conv(c, cout, 1)
        cin = cout
    return total + bn(width)  # the final BN before pooling


def preact18_params(width: int) -> int:
    """PreAct-ResNet-18: no BN after the stem, no BN in the shortcut, none after layer4."""
    total = conv(3, width, 3)
    cin = width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        cout = width * mult
        for i in range(2):
            c, s = (cin, stride) if i == 0 else (cout, 1)
            total += bn(c) + conv(c, cout, 3) + bn(cout) + conv(cout, cout, 3)
            if s != 1 or c != cout:
                total += conv(c, cout, 1)
        cin = cout
    return total


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_the_five_backbones_and_the_config_accepts_them():
    from engine.config import load_config

    assert tuple(BACKBONES) == KNOWN
    for arch in KNOWN:
        assert load_config(None, [f"model.arch={arch}"]).model.arch == arch
    with pytest.raises(UserError, match="config: model.arch 'wrn16' is unknown"):
        load_config(None, ["model.arch=wrn16"])


def test_unknown_arch_names_model_arch_and_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        build_backbone("wrn_16_1", 64)
    msg = str(err.value)
    assert "model.arch" in msg and "'wrn_16_1'" in msg
    for arch in KNOWN:
        assert arch in msg


@pytest.mark.parametrize("width", [64, 128, 16, 4])
def test_wrn16_1_parameter_count(width):
    net = build_backbone("wrn16_1", width)
    assert n_params(net) == wrn16_params(width)
    assert net.feature_dim == width


def test_wrn16_1_is_the_published_size():
    # WRN-16-1 on CIFAR-10: 0.175M parameters with its 64 -> 10 classifier.
    assert wrn16_params(64) == 174_416
    assert n_params(Classifier("wrn16_1", 64, 10)) == 174_416 + 64 * 10 + 10


@pytest.mark.parametrize("width", [64, 32, 4])
def test_preact_resnet18_parameter_count(width):
    net = build_backbone("preact_resnet18", width)
    assert n_params(net) == preact18_params(width)
    assert net.feature_dim == 8 * width


def test_preact_resnet18_is_the_published_size():
    # BackdoorBench's PreActResNet18 for CIFAR-10: 11,171,146 parameters with its 512 -> 10 linear.
    assert preact18_params(64) + 512 * 10 + 10 == 11_171_146
    assert n_params(Classifier("preact_resnet18", 64, 10)) == 11_171_146


def test_wrn16_1_width_must_be_a_multiple_of_4():
    with pytest.raises(UserError, match="model.width"):
        build_backbone("wrn16_1", 6)


@pytest.mark.parametrize("arch,width", [("wrn16_1", 64), ("wrn16_1", 8), ("preact_resnet18", 8)])
def test_output_is_a_flat_feature_vector_and_trains(arch, width):
    torch.manual_seed(0)
    net = build_backbone(arch, width)
    x = torch.randn(3, 3, 32, 32)
    out = net(x)
    assert out.shape == (3, net.feature_dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()  # every parameter is used
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    assert net(x[:1]).shape == (1, net.feature_dim)


def test_parameter_names_are_the_references():
    """So a reference checkpoint's backbone loads by name (its classifier left out)."""
    wrn = build_backbone("wrn16_1", 64).state_dict()
    for key in ("conv1.weight", "block1.layer.0.bn1.running_mean", "block1.layer.1.conv2.weight",
                "block2.layer.0.convShortcut.weight", "block3.layer.0.convShortcut.weight", "bn1.weight"):
        assert key in wrn, key
    assert "block1.layer.0.convShortcut.weight" not in wrn  # 16 -> 16: identity shortcut
    pre = build_backbone("preact_resnet18", 64).state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight"):
        assert key in pre, key
    assert "layer1.0.shortcut.0.weight" not in pre and "bn1.weight" not in pre and "conv1.bias" not in pre

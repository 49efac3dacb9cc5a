"""The CIFAR ResNet-18 starts from the reference's initialisation."""
from __future__ import annotations

import math

import torch
from torch import nn

from engine.models.resnet import CifarResNet18


def test_convolutions_are_kaiming_normal_fan_out_and_batchnorm_is_identity():
    torch.manual_seed(0)
    net = CifarResNet18(width=64)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20
    for conv in convs:
        out_ch, _, kh, kw = conv.weight.shape
        want = math.sqrt(2.0) / math.sqrt(out_ch * kh * kw)  # gain(relu) / sqrt(fan_out)
        w = conv.weight.detach()
        # A normal of that std: the sample std within 5% on every layer big enough.
        if w.numel() >= 10_000:
            assert abs(float(w.std()) / want - 1) < 0.05, conv
            assert abs(float(w.mean())) < 0.05 * want
    # PyTorch's default (kaiming_uniform, a=sqrt(5)) has std sqrt(1 / (3 fan_in)): far off.
    last = convs[-1].weight
    assert float(last.std()) > 1.5 * math.sqrt(1 / (3 * last[0].numel()))
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))

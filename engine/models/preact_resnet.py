"""PreAct-ResNet-18 (He et al., Identity Mappings in Deep Residual Networks, 2016) as
BackdoorBench builds it (SCLBD/BackdoorBench, models/preact_resnet.py, ``PreActResNet18``),
for 32 px inputs.

A 3x3 stride-1 convolution to 64 channels (no BN or ReLU after it, no max-pool), then four
stages of two PreActBlocks (BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv) with 64, 128, 256 and
512 channels and strides 1, 2, 2, 2, then global average pooling. A block whose stride or
channels change adds a 1x1 convolution (no BN) of its pre-activated input as the shortcut;
otherwise the shortcut is the raw input. As in BackdoorBench there is no BN or ReLU after the
last stage: its output is pooled as it is. No classifier: engine/models/compose.py adds it.

``width`` (model.width) is the first stage's channels, as for cifar_resnet18: the stem and
the stages have width, 2 width, 4 width and 8 width channels, so 64 (the default) is the
reference network. ``feature_dim`` is 8 width.

Parameter names are BackdoorBench's (``conv1``, ``layer1.0.bn1``, ``layer2.0.shortcut.0``,
...), so a BackdoorBench checkpoint's backbone loads as it is (without its ``linear``), and
so is the initialisation: PyTorch's defaults. The pooling is adaptive, as in BackdoorBench's
current file.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models.backbones import BACKBONES
from engine.models.resnet import ProjectionShortcut


class PreActBlock(nn.Module):
    """The pre-activation BasicBlock."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(ProjectionShortcut(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


@BACKBONES.register("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreAct-ResNet-18 without its classifier; width 64 is BackdoorBench's network."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        layers, in_planes = [], width
        for mult, stride in [(1, 1), (2, 2), (4, 2), (8, 2)]:
            layers.append(nn.Sequential(PreActBlock(in_planes, width * mult, stride),
                                        PreActBlock(width * mult, width * mult, 1)))
            in_planes = width * mult
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

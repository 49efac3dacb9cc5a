"""WRN-16-1: the Wide ResNet (Zagoruyko & Komodakis, 2016) that ABL's reference code trains
(bboylyg/ABL, models/wresnet.py: ``WideResNet(depth=16, widen_factor=1, dropRate=0)``).

A 3x3 convolution to 16 channels, then three groups of (16 - 4) / 6 = 2 pre-activation
BasicBlocks (BN, ReLU, 3x3 conv, BN, ReLU, 3x3 conv) with strides 1, 2, 2, a final BN and
ReLU, and global average pooling. A block whose channels change adds a 1x1 convolution of
its pre-activated input as the shortcut; otherwise the shortcut is the raw input. No
classifier: engine/models/compose.py adds it.

``width`` (model.width) is the last group's channels: the groups have width/4, width/2 and
width channels and the stem keeps 16, as a Wide ResNet does at every widen factor, so
``width = 64 * k`` is WRN-16-k exactly: 64 (the default) is WRN-16-1, the reference, and 128
is WRN-16-2. ``feature_dim`` is ``width``. It must be a multiple of 4.

Parameter and buffer names are the reference's (``conv1``, ``block1.layer.0.bn1``, ...,
``convShortcut``, ``bn1``), so a reference checkpoint's backbone loads as it is (without its
``fc``). Initialisation is the reference's: convolutions normal with std sqrt(2 / fan_out),
BatchNorm weight 1, bias 0. The pooling is adaptive (the reference's ``avg_pool2d(8)`` is the
same on 32 px inputs).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.errors import UserError
from engine.models.backbones import BACKBONES
from engine.models.resnet import ProjectionShortcut, reference_init

DEPTH = 16
STEM_CHANNELS = 16


class WideBasicBlock(nn.Module):
    """The reference's pre-activation BasicBlock, dropout 0."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # As the reference: the shortcut is the identity exactly when the channels match
        # (every block whose stride is 2 changes the channels).
        self.convShortcut = None if self.equal_in_out else ProjectionShortcut(in_planes, out_planes, 1, stride,
                                                                              bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.convShortcut is None else self.convShortcut(pre))


class WideGroup(nn.Module):
    """The reference's NetworkBlock: ``blocks`` blocks under ``layer``, the first strided."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes,
                                                    stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@BACKBONES.register("wrn16_1")
class WideResNet16(nn.Module):
    """WRN-16-(width / 64) without its classifier; width 64 is ABL's WRN-16-1."""

    def __init__(self, width: int = 64):
        super().__init__()
        if width % 4 or width < 4:
            raise UserError(f"model.width must be a positive multiple of 4 for wrn16_1, got {width}")
        blocks = (DEPTH - 4) // 6
        channels = [width // 4, width // 2, width]
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, 1, 1, bias=False)
        self.block1 = WideGroup(blocks, STEM_CHANNELS, channels[0], 1)
        self.block2 = WideGroup(blocks, channels[0], channels[1], 2)
        self.block3 = WideGroup(blocks, channels[1], channels[2], 2)
        self.bn1 = nn.BatchNorm2d(channels[2])
        self.feature_dim = channels[2]
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = torch.relu(self.bn1(x))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

"""ResNets: the CIFAR variant (3x3 stride-1 stem, no max-pool) and torchvision's.

Registered as model.arch cifar_resnet18 (``width``: the first stage's channels, 64 = ResNet-18
proper), resnet18 (width must be 64) and resnet50 (``width``: torchvision's width_per_group).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.errors import UserError
from engine.models.backbones import BACKBONES, build_backbone  # noqa: F401  (build_backbone: its old home)


# oneDNN's AVX2 kernel for the weight gradient of a 1x1, stride-2, channels_last
# convolution with fewer than 8 input channels hangs or segfaults (torch 2.14.1 on an AMD
# EPYC Zen 3, which has AVX2 and no AVX-512; the AVX-512 kernel is fine). Only narrow nets
# have such a shortcut (cifar_resnet18 with model.width < 8, as the tests use), and its
# weights are tiny, so on CPU that one convolution runs in NCHW instead.
ONEDNN_NARROW_1X1_CHANNELS = 8


class ProjectionShortcut(nn.Conv2d):
    """The 1x1 strided convolution of a ResNet shortcut (state_dict as nn.Conv2d's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.in_channels < ONEDNN_NARROW_1X1_CHANNELS and self.stride != (1, 1):
            # Both operands NCHW: a channels_last weight alone makes PyTorch pick the NHWC
            # kernel, and .contiguous() keeps a 1x1 weight's channels_last strides (it
            # counts as contiguous already), so the weight is cloned with NCHW strides.
            weight = self.weight.clone(memory_format=torch.contiguous_format)
            return self._conv_forward(x.contiguous(), weight, self.bias)
        return super().forward(x)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(ProjectionShortcut(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def reference_init(module: nn.Module) -> None:
    """The DBD reference's initialisation of its CIFAR ResNet: every convolution
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, every BatchNorm weight 1
    and bias 0 (PyTorch's default for convolutions is kaiming_uniform with a=sqrt(5))."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


@BACKBONES.register("cifar_resnet18")
class CifarResNet18(nn.Module):
    """ResNet-18 for 32 px inputs; ``width`` scales every stage (64 = the standard net)."""

    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        layers, in_planes = [], w
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            blocks = [BasicBlock(in_planes, w * mult, stride), BasicBlock(w * mult, w * mult, 1)]
            in_planes = w * mult
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.feature_dim = in_planes
        reference_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class TorchvisionBackbone(nn.Module):
    """torchvision ResNet-18/50 (7x7 stem, max-pool) without its classifier."""

    def __init__(self, arch: str, width: int = 64):
        super().__init__()
        import torchvision

        if arch == "resnet18":
            net = torchvision.models.resnet18(weights=None)
        elif arch == "resnet50":
            # width_per_group scales the bottleneck width (64 = standard ResNet-50).
            net = torchvision.models.resnet50(weights=None, width_per_group=width)
        else:
            raise UserError(f"unknown torchvision arch {arch!r}")
        if arch == "resnet18" and width != 64:
            raise UserError("model.width must be 64 for resnet18 (torchvision); use cifar_resnet18 to vary it")
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@BACKBONES.register("resnet18")
def torchvision_resnet18(width: int = 64) -> TorchvisionBackbone:
    return TorchvisionBackbone("resnet18", width)


@BACKBONES.register("resnet50")
def torchvision_resnet50(width: int = 64) -> TorchvisionBackbone:
    return TorchvisionBackbone("resnet50", width)

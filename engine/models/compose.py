"""The two model shapes the stages train: backbone + projection, backbone + classifier.

Both keep the backbone under the attribute ``backbone`` so checkpoints move between
stages by prefix (pretrain -> linear -> finetune).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models.heads import LinearClassifier, ProjectionHead
from engine.models.backbones import build_backbone


class SimCLRModel(nn.Module):
    def __init__(self, arch: str, width: int, proj_hidden: int = 512, proj_dim: int = 128):
        super().__init__()
        self.backbone = build_backbone(arch, width)
        self.head = ProjectionHead(self.backbone.feature_dim, proj_hidden, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Classifier(nn.Module):
    def __init__(self, arch: str, width: int, num_classes: int):
        super().__init__()
        self.backbone = build_backbone(arch, width)
        self.classifier = LinearClassifier(self.backbone.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))

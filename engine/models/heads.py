from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """The DBD reference SimCLR head: Linear, BatchNorm1d, ReLU, Linear, L2-normalise."""

    def __init__(self, in_dim: int, hidden: int = 512, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net(x), dim=1)


class LinearClassifier(nn.Linear):
    """One Linear layer from features to classes (the DBD classifier)."""

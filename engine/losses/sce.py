"""Symmetric cross-entropy (Wang et al., 2019), as the DBD reference computes it.

The reverse term takes log of a one-hot label clamped to [1e-4, 1], so for a sample
of class y it equals -log(1e-4) * (1 - p_y) ~= 9.21 * (1 - p_y): bounded, which is
what makes the loss robust to the poisoned (wrong) labels in the linear stage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ONE_HOT_FLOOR = 1e-4
PROB_FLOOR = 1e-7


def symmetric_cross_entropy(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.1,
                            beta: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    logits = logits.float()
    ce = F.cross_entropy(logits, target, reduction="none")
    prob = F.softmax(logits, dim=1).clamp(min=PROB_FLOOR, max=1.0)
    one_hot = F.one_hot(target, logits.shape[1]).float().clamp(min=ONE_HOT_FLOOR, max=1.0)
    rce = -(prob * torch.log(one_hot)).sum(dim=1)
    loss = alpha * ce + beta * rce
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"unknown reduction {reduction!r}")

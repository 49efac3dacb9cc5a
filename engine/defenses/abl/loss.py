"""ABL's isolation loss: the batch-mean CE held at a floor.

Both reference variants act on the batch mean L, not per sample, and both step along
sign(L - gamma) * grad L: the model descends while the batch loss is above the floor and
ascends below it, so samples learnt fastest (the poisoned ones) end with the lowest loss
without the whole set collapsing to zero.
"""
from __future__ import annotations

import torch

KINDS = ("flooding", "lga")


def floored_loss(loss: torch.Tensor, kind: str, *, flooding: float, gamma: float) -> torch.Tensor:
    """``flooding``: |L - b| + b (b = ``flooding``); ``lga``: sign(L - gamma) * L."""
    if kind == "flooding":
        return (loss - flooding).abs() + flooding
    if kind == "lga":
        # sign() has no gradient: autograd gives sign(L - gamma) * grad L, as the reference.
        return torch.sign(loss - gamma) * loss
    raise ValueError(f"unknown ABL loss {kind!r}; known: {', '.join(KINDS)}")


def floor_sign(loss: torch.Tensor, kind: str, *, flooding: float, gamma: float) -> torch.Tensor:
    """sign(L - level), detached: the factor both variants put on grad L. The stage
    multiplies it into the loss itself when the batch mean is taken over ranks."""
    if kind not in KINDS:
        raise ValueError(f"unknown ABL loss {kind!r}; known: {', '.join(KINDS)}")
    return torch.sign(loss.detach() - (flooding if kind == "flooding" else gamma))

"""Cutout as ABL's reference applies it in fine-tuning (``Cutout(1, 3)`` after ToTensor).

One hole per image: a centre (y, x) uniform over the image and the box
[y - length // 2, y + length // 2) x [x - length // 2, x + length // 2), clipped to the
image. With the reference's length 3 the box is 2x2 (its clip arithmetic), and fully
inside the image only away from the border. The reference zeroes the [0, 1] image; here
the views are normalised, so the hole is filled with the normalised value of black.
"""
from __future__ import annotations

from typing import Sequence

import torch


def cutout(views: torch.Tensor, length: int, mean: Sequence[float], std: Sequence[float],
           generator: torch.Generator) -> torch.Tensor:
    """``views``: normalised NCHW; returns a copy with one hole per image."""
    n, c, h, w = views.shape
    dev = views.device
    cy = torch.randint(0, h, (n,), generator=generator, device=dev)
    cx = torch.randint(0, w, (n,), generator=generator, device=dev)
    half = length // 2
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows[None] >= (cy - half)[:, None]) & (rows[None] < (cy + half)[:, None])
    in_cols = (cols[None] >= (cx - half)[:, None]) & (cols[None] < (cx + half)[:, None])
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    black = (-torch.tensor(mean, dtype=views.dtype, device=dev) / torch.tensor(std, dtype=views.dtype, device=dev))
    return torch.where(hole, black.view(1, c, 1, 1), views)

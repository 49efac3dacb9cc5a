"""Losses and MixMatch pieces against values computed by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.losses.mixmatch import interleave, linear_rampup, mixmatch_loss, mixup, sharpen
from engine.losses.sce import symmetric_cross_entropy


def test_sce_hand_computed():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = torch.tensor([0, 2])
    p0 = math.exp(2) / (math.exp(2) + 1 + math.exp(-1))
    ce = [-math.log(p0), math.log(3)]
    # reverse CE: -sum_k p_k log(onehot_k clamped at 1e-4) = -log(1e-4) * (1 - p_y)
    rce = [-math.log(1e-4) * (1 - p0), -math.log(1e-4) * (2 / 3)]
    per = symmetric_cross_entropy(logits, y, alpha=0.1, beta=1.0, reduction="none")
    expect = [0.1 * c + r for c, r in zip(ce, rce)]
    np.testing.assert_allclose(per.numpy(), expect, rtol=1e-5)
    assert symmetric_cross_entropy(logits, y).item() == pytest.approx(sum(expect) / 2, rel=1e-5)
    assert -math.log(1e-4) == pytest.approx(9.21, abs=0.01)


def test_sharpen():
    p = torch.tensor([[0.6, 0.3, 0.1]])
    out = sharpen(p, 0.5)
    expect = np.array([0.36, 0.09, 0.01]) / 0.46
    np.testing.assert_allclose(out.numpy()[0], expect, rtol=1e-6)
    np.testing.assert_allclose(sharpen(p, 1.0).numpy(), p.numpy(), rtol=1e-6)


def test_mixup_lambda_at_least_half_and_linear():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 3, 4, 4)
    y = torch.eye(4)[torch.randint(0, 4, (16,), generator=g)]
    for _ in range(20):
        mx, my, lam = mixup(x, y, 0.75, generator=g)
        assert 0.5 <= lam <= 1.0
        # mixed = lam * x + (1 - lam) * x[perm] for one permutation, same for targets
        diff = (mx - lam * x) / (1 - lam) if lam < 1 else None
        if diff is not None:
            perm = [int(torch.argmin(((x - d) ** 2).flatten(1).sum(1))) for d in diff]
            torch.testing.assert_close(my, lam * y + (1 - lam) * y[perm])
            assert sorted(perm) == list(range(16))


def test_interleave_round_trip_and_mixing():
    B = 7
    parts = [torch.full((B,), float(i)) for i in range(3)]
    mixed = interleave(parts, B)
    # Every forward batch holds labelled samples (part 0) beside its own part, and the
    # first holds a slice of every part: no BatchNorm batch sees one part alone.
    assert set(mixed[0].tolist()) == {0.0, 1.0, 2.0}
    for i, m in enumerate(mixed[1:], start=1):
        assert set(m.tolist()) == {0.0, float(i)}
    assert sorted(torch.cat(mixed).tolist()) == sorted(torch.cat(parts).tolist())
    back = interleave(mixed, B)
    for a, b in zip(parts, back):
        torch.testing.assert_close(a, b)


def test_mixmatch_loss_and_ramp():
    lx_logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [0.25, 0.75]
    tx = torch.tensor([[0.5, 0.5]])
    lu_logits = torch.tensor([[0.0, 0.0]])
    tu = torch.tensor([[1.0, 0.0]])
    lx, lu = mixmatch_loss(lx_logits, tx, lu_logits, tu)
    assert lx.item() == pytest.approx(-(0.5 * math.log(0.25) + 0.5 * math.log(0.75)), rel=1e-6)
    assert lu.item() == pytest.approx(((0.5 - 1) ** 2 + 0.5 ** 2) / 2, rel=1e-6)
    assert linear_rampup(10, 190) == pytest.approx(10 / 190)
    assert linear_rampup(500, 190) == 1.0 and linear_rampup(-1, 190) == 0.0

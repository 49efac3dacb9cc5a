"""NT-Xent across ranks: 2 real gloo processes match one process on the whole batch."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine.losses.ntxent import nt_xent

B, D_IN, D_OUT, T = 12, 10, 6, 0.5


def _reference_dbd(features: torch.Tensor, temperature: float) -> torch.Tensor:
    # The DBD reference's SimCLR loss, transcribed: features (b, 2, dim).
    b = features.shape[0]
    mask = torch.eye(b).repeat(1, 2)
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    dot = features[:, 0] @ contrast.T / temperature
    logits = dot - dot.max(dim=1, keepdim=True).values.detach()
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(b).view(-1, 1), 0)
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def _data():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(B, D_IN, generator=g), torch.randn(B, D_IN, generator=g)
    w = torch.randn(D_OUT, D_IN, generator=g)
    return x1, x2, w


def _single(form: str):
    x1, x2, w0 = _data()
    w = w0.clone().requires_grad_(True)
    loss = nt_xent(F.normalize(x1 @ w.T, dim=1), F.normalize(x2 @ w.T, dim=1), T, form)
    loss.backward()
    return loss.detach(), w.grad.clone()


def test_reference_form_matches_dbd_code():
    x1, x2, w = _data()
    z1, z2 = F.normalize(x1 @ w.T, dim=1), F.normalize(x2 @ w.T, dim=1)
    assert torch.allclose(nt_xent(z1, z2, T, "reference"), _reference_dbd(torch.stack([z1, z2], 1), T), atol=1e-6)


def test_symmetric_form_is_standard_ntxent():
    x1, x2, w = _data()
    z1, z2 = F.normalize(x1 @ w.T, dim=1), F.normalize(x2 @ w.T, dim=1)
    z = torch.cat([z1, z2])
    sim = (z @ z.T / T).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(B) + B, torch.arange(B)])
    assert torch.allclose(nt_xent(z1, z2, T, "symmetric"), F.cross_entropy(sim, target), atol=1e-6)


def _worker(rank: int, world: int, port: int, form: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x1, x2, w0 = _data()
        n = B // world
        sl = slice(rank * n, (rank + 1) * n)
        w = w0.clone().requires_grad_(True)
        loss = nt_xent(F.normalize(x1[sl] @ w.T, dim=1), F.normalize(x2[sl] @ w.T, dim=1), T, form)
        loss.backward()
        # What DDP does: average gradients and (for logging) losses over ranks.
        grad = w.grad.clone()
        torch.distributed.all_reduce(grad)
        grad /= world
        mean_loss = loss.detach().clone()
        torch.distributed.all_reduce(mean_loss)
        mean_loss /= world
        torch.save({"loss": mean_loss, "grad": grad}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["reference", "symmetric"])
def test_two_ranks_match_one_process(tmp_path, form):
    world = 2
    out = str(tmp_path / "res")
    mp.start_processes(_worker, args=(world, _port(), form, out), nprocs=world, start_method="spawn", join=True)
    loss1, grad1 = _single(form)
    for r in range(world):
        res = torch.load(f"{out}.{r}", weights_only=True)
        assert torch.allclose(res["loss"], loss1, atol=1e-5), (r, res["loss"], loss1)
        assert torch.allclose(res["grad"], grad1, atol=1e-5), (r, (res["grad"] - grad1).abs().max())
    # The gradient is not merely rescaled: it is the full-batch gradient, not 1/world of it.
    assert grad1.abs().max() > 1e-3

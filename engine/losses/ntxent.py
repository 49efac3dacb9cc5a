"""NT-Xent (SimCLR's contrastive loss) over the embeddings of every rank.

Each rank computes the loss of its own anchors against the embeddings of all ranks.
The gather is differentiable: forward all-gathers, backward all-reduces (sums) the
incoming gradient and keeps this rank's slice. Every rank's loss depends on every
rank's embeddings, so the sum is what the chain rule asks for; combined with DDP's
gradient averaging the parameter gradients equal those of one process on the
concatenated batch. (The DBD reference returns the local slice without the sum,
which scales gradients by 1/world_size.)

Two forms, both on L2-normalised embeddings ``z1``, ``z2`` (the two views, B x D):

* ``reference``: the DBD code's one-directional loss. Anchors are the first views;
  candidates are all 2N embeddings (N = global batch) except the anchor itself; the
  positive is the anchor's second view. Mean over the N anchors.
* ``symmetric``: the standard NT-Xent. Both views are anchors, against the same 2N - 1
  candidates. Mean over the 2N anchors.

The returned value is the mean over this rank's anchors; ranks hold equal batches, so
the mean over ranks is the global loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

FORMS = ("reference", "symmetric")


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated in rank order (identity on one process)."""
    world, _ = _world()
    return _GatherWithGrad.apply(x) if world > 1 else x


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, form: str = "reference") -> torch.Tensor:
    """Contrastive loss of this rank's anchors; 16-bit embeddings are promoted to fp32."""
    if form not in FORMS:
        raise ValueError(f"nt_xent form must be one of {FORMS}, got {form!r}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError("nt_xent needs two (B, D) embeddings of one shape, "
                         f"got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent temperature must be > 0, got {temperature}")
    if z1.dtype in (torch.float16, torch.bfloat16):
        z1, z2 = z1.float(), z2.float()
    world, rank = _world()
    b = z1.shape[0]
    all1, all2 = gather_with_grad(z1), gather_with_grad(z2)
    n = all1.shape[0]
    candidates = torch.cat([all1, all2], dim=0)  # 2N: first views of every rank, then second views
    own = torch.arange(b, device=z1.device) + rank * b  # this rank's rows among the first views
    if form == "reference":
        anchors, self_idx, pos_idx = z1, own, own + n
    else:
        anchors = torch.cat([z1, z2], dim=0)
        self_idx = torch.cat([own, own + n])
        pos_idx = torch.cat([own + n, own])
    logits = anchors @ candidates.T / temperature
    # An anchor is never its own candidate: -inf drops it from the softmax denominator.
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n).bool(), float("-inf"))
    return F.cross_entropy(logits, pos_idx)

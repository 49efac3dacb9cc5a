"""MixMatch's pieces (Berthelot et al., 2019) as DBD's fine-tuning stage uses them."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    pt = p ** (1.0 / temperature)
    return pt / pt.sum(dim=1, keepdim=True)


def mixup(inputs: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mix each sample with a random partner; lambda = max(lambda, 1 - lambda) keeps the
    mixed sample closer to its own input, so labelled/unlabelled identities survive.

    lambda (a 0-d tensor) and the permutation are drawn on ``inputs``' device, from
    ``generator`` (which must live there): no value crosses to the host, so a GPU step
    never waits for it."""
    dev = inputs.device
    if generator is None:
        lam = torch.distributions.Beta(torch.tensor(alpha, device=dev), torch.tensor(alpha, device=dev)).sample()
    else:
        lam = _beta(alpha, generator, dev)
    lam = torch.maximum(lam, 1.0 - lam)
    perm = torch.randperm(inputs.shape[0], generator=generator, device=dev)
    mixed_x = lam * inputs + (1.0 - lam) * inputs[perm]
    mixed_y = lam * targets + (1.0 - lam) * targets[perm]
    return mixed_x, mixed_y, lam


def _beta(alpha: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Beta(a, a) from two Gammas, drawn from the given generator for reproducibility.
    g1 = torch._standard_gamma(torch.full((), alpha, device=device), generator=generator)
    g2 = torch._standard_gamma(torch.full((), alpha, device=device), generator=generator)
    return g1 / (g1 + g2)


def interleave_offsets(batch: int, nu: int) -> list[int]:
    groups = [batch // (nu + 1)] * (nu + 1)
    for x in range(batch - sum(groups)):
        groups[-x - 1] += 1
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g)
    return offsets


def interleave(xy: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Swap slices between the labelled batch and the unlabelled batches so that every
    forward pass (and so every BatchNorm batch) mixes labelled and unlabelled samples.
    Applying it twice restores the original order."""
    nu = len(xy) - 1
    offsets = interleave_offsets(batch, nu)
    parts = [[v[offsets[p]:offsets[p + 1]] for p in range(nu + 1)] for v in xy]
    for i in range(1, nu + 1):
        parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
    return [torch.cat(v, dim=0) for v in parts]


def linear_rampup(current: float, length: float) -> float:
    if length <= 0:
        return 1.0
    return float(min(max(current / length, 0.0), 1.0))


def mixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor,
                  targets_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lx: soft cross-entropy on the labelled part; Lu: mean squared error between the
    predicted and the guessed probability vectors on the unlabelled part."""
    lx = -(F.log_softmax(logits_x.float(), dim=1) * targets_x).sum(dim=1).mean()
    lu = ((F.softmax(logits_u.float(), dim=1) - targets_u) ** 2).mean()
    return lx, lu

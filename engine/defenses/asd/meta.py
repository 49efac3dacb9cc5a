"""ASD's meta-split: a virtual model's one-epoch update, whose loss drop ranks the samples.

The real model is deep-copied; a fresh Adam steps only the parameters under
``params`` (layer3, layer4 and the head in the reference) for ``epochs`` supervised
epochs of mean CE over every training sample with its given label, under the training
view, in train mode. Poisoned samples' loss falls most under such an update, so the
samples whose loss falls least form the pool. The real model is never touched.

BatchNorm: the reference trains the copy in train mode, so the running statistics of
every layer move, the frozen stem, layer1 and layer2 included (``bn: train``);
``bn: frozen_below`` keeps the layers that are not stepped in eval mode, so only the
stepped part of the copy changes.

On N processes each rank takes its shard of every global batch and the gradients of
the stepped parameters are averaged over ranks before each Adam step, so every rank
holds the same virtual model (as DDP would keep it).
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UserError

BN_MODES = ("train", "frozen_below")


def stepped(module: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Names of the parameters under ``prefixes`` (one clear error when none match)."""
    names = [n for n, _ in module.named_parameters() if any(n == p or n.startswith(p + ".") for p in prefixes)]
    if not names:
        raise UserError(f"asd.meta_params {list(prefixes)} name no parameter of this model; its top-level parts: "
                        f"{sorted({'.'.join(n.split('.')[:2]) for n, _ in module.named_parameters()})}")
    return names


def virtual_update(module: nn.Module, batches, dist, precision, *, prefixes: tuple[str, ...], lr: float,
                   bn: str) -> nn.Module:
    """The copy after one pass over ``batches`` (each ``(views, labels)`` on the device)."""
    virtual = copy.deepcopy(module)
    names = set(stepped(virtual, prefixes))
    params = []
    for name, p in virtual.named_parameters():
        p.requires_grad_(name in names)
        if name in names:
            params.append(p)
    optimizer = torch.optim.Adam(params, lr=lr)
    virtual.train()
    if bn == "frozen_below":
        for name, m in virtual.named_modules():
            if name and not any(name == p or name.startswith(p + ".") for p in prefixes):
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
    dev = dist.device
    # bf16 autocast as the run's steps; fp16 has no loss scaler here, so it runs in fp32.
    autocast = precision.autocast(dev) if precision.name == "bf16" else contextlib.nullcontext()
    for x, y in batches:
        with autocast:
            logits = virtual(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dist.world_size > 1:
            for p in params:
                p.grad = dist.all_reduce_sum(p.grad) / dist.world_size
        optimizer.step()
    for p in virtual.parameters():
        p.requires_grad_(False)
    return virtual.eval()

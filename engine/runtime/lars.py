"""LARS (You et al. 2017) as SimCLR uses it: SGD with momentum and a per-layer trust ratio.

The trust ratio ``eta * ||w|| / ||g + wd * w||`` (SimCLR's implementation) is a property of each layer's
whole weight tensor. Optimizers that flatten or partition parameters (DeepSpeed ZeRO
1/2, DeepSpeed's bf16/fp16 optimizers) hand it slices of many layers at once, so
``backends`` refuses those combinations. BatchNorm parameters and biases (1-D tensors)
get neither weight decay nor adaptation, as in SimCLR.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    per_layer = True  # read by engine.runtime.backends to refuse flattening backends

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, exclude_1d: bool = True):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError("LARS: lr, momentum, weight_decay must be >= 0 and eta > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      exclude_1d=exclude_1d))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                adapt = not (group["exclude_1d"] and p.ndim <= 1)
                if adapt:
                    if group["weight_decay"]:
                        g = g.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    # No adaptation for an all-zero weight or gradient (e.g. at init).
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss

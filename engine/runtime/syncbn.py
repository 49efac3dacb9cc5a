"""Synchronised BatchNorm that also runs on CPU (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors, yet the CPU runs are what make a
2-process run comparable with a 1-process run on the same global batch: without
synchronised statistics every rank normalises by its own half-batch. This module keeps
BatchNorm's parameter and buffer names (checkpoints move freely between the two) and
computes the batch statistics over all ranks with a differentiable all-reduce, so the
backward pass is exact as well. On CUDA the stock SyncBatchNorm is used instead.

On CPU the module is used for one process too, because the statistics are computed in
two passes (mean, then squared deviations): the stock CPU BatchNorm's fp32 gradient is
about 1e-2 off the fp64 one on inputs with a large mean (e.g. digits on a black
background), this one about 1e-4, so one and N processes would otherwise train
visibly different models from the same batches.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    # d(sum_r x_r)/d x_r is the identity on every rank, and every rank's loss depends on
    # the sum, so the incoming gradients are summed over ranks as well.
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x)


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm over the union of all ranks' batches (any input rank >= 2); eval mode is stock."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        factor = 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        # Statistics in at least fp32 (autocast hands bf16/fp16 activations).
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.tensor([xf.numel() / c], dtype=xf.dtype, device=x.device)
        sums = torch.cat([xf.sum(dims), count])
        sums = all_reduce_sum(sums) if sync else sums
        n = sums[-1]
        mean = sums[:c] / n
        shape = [1, c] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        # Two passes (mean, then squared deviations) as the fused kernel does: the
        # one-pass E[x^2] - E[x]^2 loses precision on large activations.
        sq = (centred * centred).sum(dims)
        var = (all_reduce_sum(sq) if sync else sq) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.to(xf.dtype).view(shape) + self.bias.to(xf.dtype).view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out.to(x.dtype)


def needs_conversion(device: torch.device, world_size: int) -> bool:
    """CUDA: only with several processes. CPU: always (same arithmetic for any world size)."""
    return world_size > 1 or device.type != "cuda"


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm*d in ``module`` becomes a synchronised one (in place where possible)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert(module)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out

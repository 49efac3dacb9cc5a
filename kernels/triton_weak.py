"""Fused Triton kernel for the weak view (pad + crop + flip + normalise) and eval normalisation.

The padded image is never materialised: each output pixel maps its padded coordinate back
to a source pixel (reflect / symmetric / edge) or to the fill value 0 (constant), so the
kernel reads each needed source byte once and writes the normalised output once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .params import WeakParams
from .specs import WeakSpec

_MODES = {"reflect": 0, "symmetric": 1, "edge": 2, "constant": 3}
_MAX_BLOCK = 1024


@triton.jit
def _pad_map(i, n, MODE: tl.constexpr):
    """Source index of padded coordinate i (relative to the unpadded origin); validity for constant."""
    # `i == i` is an all-true mask of the right shape for the modes that always hit the image.
    if MODE == 0:
        i = tl.abs(i)
        i = tl.where(i > n - 1, 2 * (n - 1) - i, i)
        valid = i == i
    elif MODE == 1:
        i = tl.where(i < 0, -i - 1, i)
        i = tl.where(i > n - 1, 2 * n - 1 - i, i)
        valid = i == i
    elif MODE == 2:
        i = tl.minimum(tl.maximum(i, 0), n - 1)
        valid = i == i
    else:
        valid = (i >= 0) & (i < n)
        i = tl.minimum(tl.maximum(i, 0), n - 1)
    return i, valid


@triton.jit
def _crop_kernel(
    src_ptr, out_ptr, top_ptr, left_ptr, flip_ptr,
    H, W, stride_b, stride_h, stride_w, stride_c,
    m0, m1, m2, s0, s1, s2,
    OUT_H: tl.constexpr, OUT_W: tl.constexpr, PAD: tl.constexpr, MODE: tl.constexpr,
    HAS_PARAMS: tl.constexpr, BLOCK: tl.constexpr,
):
    bi = tl.program_id(0)
    ti = tl.program_id(1)
    offs = ti * BLOCK + tl.arange(0, BLOCK)
    mask = offs < OUT_H * OUT_W
    y = offs // OUT_W
    x = offs % OUT_W
    if HAS_PARAMS:
        top = tl.load(top_ptr + bi)
        left = tl.load(left_ptr + bi)
        flip = tl.load(flip_ptr + bi)
        x = tl.where(flip != 0, OUT_W - 1 - x, x)
        y = y + top
        x = x + left
    sy, vy = _pad_map(y - PAD, H, MODE)
    sx, vx = _pad_map(x - PAD, W, MODE)
    ld = mask & vy & vx
    p = src_ptr + bi.to(tl.int64) * stride_b + sy * stride_h + sx * stride_w
    r = tl.load(p, mask=ld, other=0).to(tl.float32) * (1.0 / 255.0)
    g = tl.load(p + stride_c, mask=ld, other=0).to(tl.float32) * (1.0 / 255.0)
    b = tl.load(p + 2 * stride_c, mask=ld, other=0).to(tl.float32) * (1.0 / 255.0)
    o = (bi.to(tl.int64) * (OUT_H * OUT_W) + offs) * 3
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o, ((r - m0) / s0).to(ty), mask=mask)
    tl.store(out_ptr + o + 1, ((g - m1) / s1).to(ty), mask=mask)
    tl.store(out_ptr + o + 2, ((b - m2) / s2).to(ty), mask=mask)


def _launch(images, out_h, out_w, pad, mode, params, mean, std, dtype, block):
    b = images.shape[0]
    npix = out_h * out_w
    blk = block if block is not None else min(triton.next_power_of_2(npix), _MAX_BLOCK)
    out = torch.empty((b, out_h, out_w, 3), device=images.device, dtype=dtype)
    if params is None:
        top = left = flip = images  # never read: HAS_PARAMS=False
    else:
        top = params.top.to(torch.int32).contiguous()
        left = params.left.to(torch.int32).contiguous()
        flip = params.flip.to(torch.int32).contiguous()
    _crop_kernel[(b, triton.cdiv(npix, blk))](
        images, out, top, left, flip,
        images.shape[1], images.shape[2], *images.stride(),
        mean[0], mean[1], mean[2], std[0], std[1], std[2],
        OUT_H=out_h, OUT_W=out_w, PAD=pad, MODE=mode, HAS_PARAMS=params is not None, BLOCK=blk,
    )
    return out.permute(0, 3, 1, 2)


def weak_view(images: torch.Tensor, spec: WeakSpec, params: WeakParams, dtype=torch.float32, block=None):
    return _launch(images, spec.size, spec.size, spec.padding, _MODES[spec.padding_mode], params,
                   spec.mean, spec.std, dtype, block)


def normalize(images: torch.Tensor, mean, std, dtype=torch.float32, block=None):
    # Identity crop: no padding, origin 0, no flip; the mode is irrelevant for in-range indices.
    return _launch(images, images.shape[1], images.shape[2], 0, _MODES["edge"], None, mean, std, dtype, block)

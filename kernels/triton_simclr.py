"""Fused Triton kernels for SimCLR views.

Structure (one launch for all views, then two blur passes that only touch blurred samples):

1. `_simclr_kernel`, grid (B, n_views): one program per (sample, view) walks the output
   in pixel tiles. Per output pixel it gathers the bicubic/bilinear taps straight from the
   uint8 NHWC source (crop offset, per-crop clamping and flip folded into the tap indices),
   clamps to [0, 1], applies the four jitter ops in the sample's order, grayscale, and
   writes either the normalised final pixel (no blur) or the float32 [0, 1] pixel to a
   scratch buffer (blur).
   Contrast blends with the mean luma of the image as it is at that point of the order,
   a whole-image reduction in the middle of a per-pixel chain. One program owns one whole
   image, so no cross-program reduction is needed: when the image fits one tile (32 px)
   the mean is a tl.sum over the tile already in registers; otherwise a first sweep over
   the tiles recomputes resample + the ops before contrast to accumulate the luma sum,
   and a second sweep produces the output. The recompute re-reads the source from L2,
   cheaper than a round trip of the full-resolution intermediate through HBM, and the
   first sweep is skipped for samples without jitter.
2. `_blur_pass` twice (vertical into a second scratch buffer, then horizontal fused with
   normalisation and the cast): separable Gaussian with reflect padding, weights
   precomputed per sample. K taps cover the spec's widest kernel; a sample's weights are
   zero beyond its own radius (2*ceil(3*sigma)+1 taps by default) and those loads are
   masked. Programs of unblurred samples mask every load and store.

Arithmetic follows torch_path (itself checked against torchvision) operation by operation;
remaining differences are fp32 rounding (FMA contraction, approximate division on GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .params import CONTRAST, SimCLRParams
from .specs import SimCLRSpec
from .torch_path import blur_radii, gaussian_kernels

_MAX_BLOCK = 1024


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _luma(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _cubic_w(t, K: tl.constexpr):
    # Keys cubic convolution (A = -0.75) for tap K in (-1, 0, 1, 2) at fractional offset t.
    A: tl.constexpr = -0.75
    if K == 0:
        x = t + 1.0
        w = ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    elif K == 1:
        w = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0
    elif K == 2:
        x = 1.0 - t
        w = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    else:
        x = 2.0 - t
        w = ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    return w


@triton.jit
def _axis(dst, scale, length, BICUBIC: tl.constexpr):
    """First tap index (relative to the crop) and fractional offset, as ATen's upsample."""
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    if not BICUBIC:
        src = tl.maximum(src, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), length - 1)
    t = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, t


@triton.jit
def _resample(
    src_ptr, base, stride_h, stride_w, stride_c, y, x, top, left, ch, cw, sy, sx, flip, mask,
    S: tl.constexpr, BICUBIC: tl.constexpr,
):
    xs = tl.where(flip != 0, S - 1 - x, x)
    iy0, ty = _axis(y, sy, ch, BICUBIC)
    ix0, tx = _axis(xs, sx, cw, BICUBIC)
    r = tl.zeros(y.shape, tl.float32)
    g = tl.zeros(y.shape, tl.float32)
    b = tl.zeros(y.shape, tl.float32)
    # Bicubic: taps i0-1 .. i0+2; bilinear: i0, i0+1.
    NT: tl.constexpr = 2 + 2 * BICUBIC
    OFF: tl.constexpr = -BICUBIC
    for i in tl.static_range(NT):
        if BICUBIC:
            wy = _cubic_w(ty, i)
        elif i == 1:
            wy = ty
        else:
            wy = 1.0 - ty
        yy = top + tl.minimum(tl.maximum(iy0 + (i + OFF), 0), ch - 1)
        row = src_ptr + base + yy * stride_h
        rr = tl.zeros(y.shape, tl.float32)
        rg = tl.zeros(y.shape, tl.float32)
        rb = tl.zeros(y.shape, tl.float32)
        for j in tl.static_range(NT):
            if BICUBIC:
                wx = _cubic_w(tx, j)
            elif j == 1:
                wx = tx
            else:
                wx = 1.0 - tx
            xx = left + tl.minimum(tl.maximum(ix0 + (j + OFF), 0), cw - 1)
            p = row + xx * stride_w
            # Scale to [0, 1] before weighting, as torchvision converts before interpolating.
            rr += wx * (tl.load(p, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0))
            rg += wx * (tl.load(p + stride_c, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0))
            rb += wx * (tl.load(p + 2 * stride_c, mask=mask, other=0).to(tl.float32) * (1.0 / 255.0))
        r += wy * rr
        g += wy * rg
        b += wy * rb
    # Clamp the bicubic overshoot, as PIL/uint8 paths do (documented deviation from the float path).
    return _clamp01(r), _clamp01(g), _clamp01(b)


@triton.jit
def _hue_shift(r, g, b, shift):
    """torchvision's _rgb_to_hsv, hue rotation, _hsv_to_rgb, element-wise."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    crd = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    max_r = maxc == r
    max_g = (maxc == g) & (maxc != r)
    max_b = (maxc != g) & (maxc != r)
    h = tl.where(max_r, bc - gc, 0.0) + tl.where(max_g, (rc + 2.0) - bc, 0.0) + tl.where(max_b, (gc + 4.0) - rc, 0.0)
    # fmod(h/6 + 1, 1) with a positive argument, then remainder(h + shift, 1): both x - floor(x).
    h = h * (1.0 / 6.0) + 1.0
    h = h - tl.floor(h)
    h = h + shift
    h = h - tl.floor(h)
    v = maxc
    h6 = h * 6.0
    fi = tl.floor(h6)
    f = h6 - fi
    i = fi.to(tl.int32)
    i = tl.where(i >= 6, i - 6, i)
    sxf = s * f
    oms = 1.0 - s
    q = _clamp01((1.0 - sxf) * v)
    t = _clamp01((sxf + oms) * v)
    p = _clamp01(oms * v)
    nr = tl.where(i == 0, v, tl.where(i == 1, q, tl.where(i == 2, p, tl.where(i == 3, p, tl.where(i == 4, t, v)))))
    ng = tl.where(i == 0, t, tl.where(i == 1, v, tl.where(i == 2, v, tl.where(i == 3, q, p))))
    nb = tl.where(i == 0, p, tl.where(i == 1, p, tl.where(i == 2, t, tl.where(i == 3, v, tl.where(i == 4, v, q)))))
    return nr, ng, nb


@triton.jit
def _jitter_op(r, g, b, op, on, bf, cf, sf, hf, mean, DO_HUE: tl.constexpr):
    """One ColorJitter op (id `op`) if `on`; brightness/contrast/saturation as one _blend."""
    f = tl.where(op == 0, bf, tl.where(op == 1, cf, tl.where(op == 2, sf, 1.0)))
    f = tl.where(on & (op != 3), f, 1.0)
    gray = _luma(r, g, b)
    target = tl.where(op == 1, mean, tl.where(op == 2, gray, 0.0))
    r = _clamp01(r * f + target * (1.0 - f))
    g = _clamp01(g * f + target * (1.0 - f))
    b = _clamp01(b * f + target * (1.0 - f))
    if DO_HUE:
        hr, hg, hb = _hue_shift(r, g, b, hf)
        use = on & (op == 3)
        r = tl.where(use, hr, r)
        g = tl.where(use, hg, g)
        b = tl.where(use, hb, b)
    return r, g, b


@triton.jit
def _finish(
    r, g, b, offs, mask, row, gray, blur, out_ptr, scratch_ptr, m0, m1, m2, s0, s1, s2, S: tl.constexpr
):
    lum = _luma(r, g, b)
    r = tl.where(gray != 0, lum, r)
    g = tl.where(gray != 0, lum, g)
    b = tl.where(gray != 0, lum, b)
    o = (row.to(tl.int64) * (S * S) + offs) * 3
    ty = out_ptr.dtype.element_ty
    keep = mask & (blur == 0)
    tl.store(out_ptr + o, ((r - m0) / s0).to(ty), mask=keep)
    tl.store(out_ptr + o + 1, ((g - m1) / s1).to(ty), mask=keep)
    tl.store(out_ptr + o + 2, ((b - m2) / s2).to(ty), mask=keep)
    # Without blur the scratch argument aliases `out` (never written then); the cast keeps it typed.
    later = mask & (blur != 0)
    sty = scratch_ptr.dtype.element_ty
    tl.store(scratch_ptr + o, r.to(sty), mask=later)
    tl.store(scratch_ptr + o + 1, g.to(sty), mask=later)
    tl.store(scratch_ptr + o + 2, b.to(sty), mask=later)


@triton.jit
def _simclr_kernel(
    src_ptr, out_ptr, scratch_ptr, ip_ptr, fp_ptr,
    B, stride_b, stride_h, stride_w, stride_c,
    m0, m1, m2, s0, s1, s2,
    S: tl.constexpr, BLOCK: tl.constexpr, N_TILES: tl.constexpr,
    BICUBIC: tl.constexpr, DO_HUE: tl.constexpr,
):
    bi = tl.program_id(0)
    vi = tl.program_id(1)
    row = vi * B + bi
    ip = ip_ptr + row * 13
    fp = fp_ptr + row * 6
    top = tl.load(ip + 0)
    left = tl.load(ip + 1)
    ch = tl.load(ip + 2)
    cw = tl.load(ip + 3)
    flip = tl.load(ip + 4)
    jit = tl.load(ip + 5) != 0
    gray = tl.load(ip + 6)
    blur = tl.load(ip + 7)
    op0 = tl.load(ip + 8)
    op1 = tl.load(ip + 9)
    op2 = tl.load(ip + 10)
    op3 = tl.load(ip + 11)
    cpos = tl.load(ip + 12)
    bf = tl.load(fp + 0)
    cf = tl.load(fp + 1)
    sf = tl.load(fp + 2)
    hf = tl.load(fp + 3)
    sy = tl.load(fp + 4)
    sx = tl.load(fp + 5)
    base = bi.to(tl.int64) * stride_b
    lanes = tl.arange(0, BLOCK)
    NPIX: tl.constexpr = S * S

    if N_TILES == 1:
        mask = lanes < NPIX
        y = lanes // S
        x = lanes % S
        r, g, b = _resample(src_ptr, base, stride_h, stride_w, stride_c, y, x, top, left, ch, cw, sy, sx, flip, mask,
                            S, BICUBIC)
        # The whole image is in registers: the contrast mean is the tile's luma at that step.
        mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
        r, g, b = _jitter_op(r, g, b, op0, jit, bf, cf, sf, hf, mean, DO_HUE)
        mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
        r, g, b = _jitter_op(r, g, b, op1, jit, bf, cf, sf, hf, mean, DO_HUE)
        mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
        r, g, b = _jitter_op(r, g, b, op2, jit, bf, cf, sf, hf, mean, DO_HUE)
        mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
        r, g, b = _jitter_op(r, g, b, op3, jit, bf, cf, sf, hf, mean, DO_HUE)
        _finish(r, g, b, lanes, mask, row, gray, blur, out_ptr, scratch_ptr, m0, m1, m2, s0, s1, s2, S)
    else:
        # Sweep 1: luma sum of the image as contrast sees it (ops placed before contrast only).
        n_first = tl.where(jit, N_TILES, 0)
        acc = tl.zeros((BLOCK,), tl.float32)
        for t in range(0, n_first):
            offs = t * BLOCK + lanes
            mask = offs < NPIX
            y = offs // S
            x = offs % S
            r, g, b = _resample(src_ptr, base, stride_h, stride_w, stride_c, y, x, top, left, ch, cw, sy, sx, flip,
                                mask, S, BICUBIC)
            r, g, b = _jitter_op(r, g, b, op0, jit & (cpos > 0), bf, cf, sf, hf, 0.0, DO_HUE)
            r, g, b = _jitter_op(r, g, b, op1, jit & (cpos > 1), bf, cf, sf, hf, 0.0, DO_HUE)
            r, g, b = _jitter_op(r, g, b, op2, jit & (cpos > 2), bf, cf, sf, hf, 0.0, DO_HUE)
            acc += tl.where(mask, _luma(r, g, b), 0.0)
        mean = tl.sum(acc, axis=0) / NPIX
        # Sweep 2: the full chain with the now known mean.
        for t in range(0, N_TILES):
            offs = t * BLOCK + lanes
            mask = offs < NPIX
            y = offs // S
            x = offs % S
            r, g, b = _resample(src_ptr, base, stride_h, stride_w, stride_c, y, x, top, left, ch, cw, sy, sx, flip,
                                mask, S, BICUBIC)
            r, g, b = _jitter_op(r, g, b, op0, jit, bf, cf, sf, hf, mean, DO_HUE)
            r, g, b = _jitter_op(r, g, b, op1, jit, bf, cf, sf, hf, mean, DO_HUE)
            r, g, b = _jitter_op(r, g, b, op2, jit, bf, cf, sf, hf, mean, DO_HUE)
            r, g, b = _jitter_op(r, g, b, op3, jit, bf, cf, sf, hf, mean, DO_HUE)
            _finish(r, g, b, offs, mask, row, gray, blur, out_ptr, scratch_ptr, m0, m1, m2, s0, s1, s2, S)


@triton.jit
def _reflect(i, n):
    i = tl.abs(i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _blur_pass(
    in_ptr, out_ptr, ip_ptr, w_ptr, B,
    m0, m1, m2, s0, s1, s2,
    S: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, VERTICAL: tl.constexpr, FINAL: tl.constexpr,
):
    bi = tl.program_id(0)
    vi = tl.program_id(1)
    ti = tl.program_id(2)
    row = vi * B + bi
    blur = tl.load(ip_ptr + row * 13 + 7)
    offs = ti * BLOCK + tl.arange(0, BLOCK)
    mask = (offs < S * S) & (blur != 0)
    y = offs // S
    x = offs % S
    img = in_ptr + row.to(tl.int64) * (S * S * 3)
    r = tl.zeros((BLOCK,), tl.float32)
    g = tl.zeros((BLOCK,), tl.float32)
    b = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + row * K + k)
        # K // 2 <= S - 1 (SimCLRSpec.blur_radius), so one reflection keeps every index in the image.
        if VERTICAL:
            idx = _reflect(y + (k - K // 2), S) * S + x
        else:
            idx = y * S + _reflect(x + (k - K // 2), S)
        # Taps beyond this sample's own radius have weight exactly 0: skip their loads (w * 0 = 0
        # is what they would add anyway), so small-sigma samples do not pay for the widest kernel.
        # (A select, not `mask & (w != 0.0)`: the interpreter cannot `&` a block with a float compare.)
        tap = tl.where(w != 0.0, mask, False)
        r += w * tl.load(img + idx * 3, mask=tap, other=0.0)
        g += w * tl.load(img + idx * 3 + 1, mask=tap, other=0.0)
        b += w * tl.load(img + idx * 3 + 2, mask=tap, other=0.0)
    o = (row.to(tl.int64) * (S * S) + offs) * 3
    if FINAL:
        ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + o, ((r - m0) / s0).to(ty), mask=mask)
        tl.store(out_ptr + o + 1, ((g - m1) / s1).to(ty), mask=mask)
        tl.store(out_ptr + o + 2, ((b - m2) / s2).to(ty), mask=mask)
    else:
        tl.store(out_ptr + o, r, mask=mask)
        tl.store(out_ptr + o + 1, g, mask=mask)
        tl.store(out_ptr + o + 2, b, mask=mask)


def pack_params(params: list[SimCLRParams], spec: SimCLRSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-view params into (V*B, 13) int32 and (V*B, 6) float32 rows, on device, no sync.

    int32 columns: top, left, crop h, crop w, flip, jitter, grayscale, blur, order[0..3],
    position of contrast in the order. float32: brightness, contrast, saturation, hue,
    height/size, width/size. The kernels index these columns by literal offsets.
    Ops the spec disables (probability 0) are off whatever the flags say, as in torch_path.
    """
    size = spec.size
    ints, floats = [], []
    for p in params:
        jit = p.jitter & (spec.jitter_p > 0)
        gray = p.grayscale & (spec.grayscale_p > 0)
        blur = p.blur & (spec.blur_p > 0)
        cpos = (p.order == CONTRAST).to(torch.int64).argmax(dim=1)
        ints.append(
            torch.cat(
                (
                    torch.stack((p.top, p.left, p.height, p.width), dim=1),
                    torch.stack((p.flip, jit, gray, blur), dim=1).to(torch.int64),
                    p.order,
                    cpos[:, None],
                ),
                dim=1,
            ).to(torch.int32)
        )
        # Scales computed by torch (IEEE division), identical to torch_path.axis_taps.
        sy = p.height.to(torch.float32) / size
        sx = p.width.to(torch.float32) / size
        floats.append(torch.stack((p.brightness, p.contrast, p.saturation, p.hue, sy, sx), dim=1).to(torch.float32))
    return torch.cat(ints).contiguous(), torch.cat(floats).contiguous()


def _warps(block: int) -> int:
    # 48 tap loads and the HSV round trip per pixel: keep a few pixels per thread, not dozens.
    return 4 if block <= 256 else 8


def _block_for(npix: int, block: int | None) -> int:
    if block is not None:
        return block
    return min(triton.next_power_of_2(npix), _MAX_BLOCK)


def simclr_views(
    images: torch.Tensor, spec: SimCLRSpec, params: list[SimCLRParams], dtype=torch.float32, block: int | None = None
) -> list[torch.Tensor]:
    """All views in one launch (+ two blur passes); `block` overrides the pixel tile (tests)."""
    b, h, w, _ = images.shape
    n_views = len(params)
    s = spec.size
    npix = s * s
    blk = _block_for(npix, block)
    n_tiles = triton.cdiv(npix, blk)
    ip, fp = pack_params(params, spec)
    out = torch.empty((n_views, b, s, s, 3), device=images.device, dtype=dtype)
    do_blur = spec.blur_p > 0
    scratch = torch.empty_like(out, dtype=torch.float32) if do_blur else out
    m, sd = spec.mean, spec.std
    sb, sh, sw, sc = images.stride()
    _simclr_kernel[(b, n_views)](
        images, out, scratch, ip, fp,
        b, sb, sh, sw, sc,
        m[0], m[1], m[2], sd[0], sd[1], sd[2],
        S=s, BLOCK=blk, N_TILES=n_tiles,
        BICUBIC=spec.interpolation == "bicubic", DO_HUE=spec.hue > 0,
        num_warps=_warps(blk),
    )
    if do_blur:
        # K is fixed by the spec (2 * blur_radius + 1: sigma_max's kernel, or the fixed one), not
        # by the batch, so no host sync and one compiled variant per spec; each row holds its
        # sample's own torchvision kernel, zero beyond its radius.
        radius = spec.blur_radius
        weights = torch.cat([gaussian_kernels(p.sigma, blur_radii(p.sigma, spec), radius) for p in params])
        weights = weights.contiguous()
        mid = torch.empty_like(scratch)
        grid = (b, n_views, n_tiles)
        common = dict(S=s, K=2 * radius + 1, BLOCK=blk, num_warps=_warps(blk))
        _blur_pass[grid](scratch, mid, ip, weights, b, m[0], m[1], m[2], sd[0], sd[1], sd[2],
                         VERTICAL=True, FINAL=False, **common)
        _blur_pass[grid](mid, out, ip, weights, b, m[0], m[1], m[2], sd[0], sd[1], sd[2],
                         VERTICAL=False, FINAL=True, **common)
    # (B, S, S, 3) contiguous permuted to NCHW is exactly the channels_last layout.
    return [out[v].permute(0, 3, 1, 2) for v in range(n_views)]

"""Fused Triton kernels for SimCLR views.

Structure (all views in one buffer; at most one pre-pass, one main launch and two blur
passes, every launch on the grid (B, n_views, pixel tiles)):

1. `_contrast_luma_kernel` (only for views of several tiles with jitter on): the pre-pass
   for the one whole-image quantity of the chain. Contrast blends with the mean luma of
   the image as it is at contrast's position in the sample's order, which depends on
   every pixel. Each program recomputes the resample and the ops placed before contrast
   for its tile and writes the tile's luma sum to `partials` (V*B, n_tiles). Per-tile
   sums in a buffer, not atomics, so the mean is the same in every run. The recompute
   re-reads the uint8 source from L2, cheaper than a full-resolution float intermediate
   through HBM. Programs of samples without jitter branch past all of it.
2. `_simclr_kernel`: one program per (sample, view, tile). Per output pixel it gathers
   the bicubic/bilinear taps straight from the uint8 NHWC source (crop offset, per-crop
   clamping and flip folded into the tap indices), clamps to [0, 1], applies the four
   jitter ops in the sample's order, grayscale, and writes either the normalised final
   pixel (no blur) or the float32 [0, 1] pixel to a scratch buffer (blur). The contrast
   mean is the sum of the row's partials (every tile of a row reduces the same values in
   the same order). When the view is one tile (32 px) the image is in registers and the
   mean is a tl.sum over it, so there is no pre-pass.
   The op at each position is per sample, i.e. uniform in a program: a scalar branch
   runs the HSV round trip only for the one position that holds hue, and only when the
   sample has jitter. Specs without hue (or without jitter, like the RandomResizedCrop
   weak view) compile variants with no HSV (or no jitter) code at all (DO_HUE, DO_JITTER).
3. `_blur_pass` twice (vertical into a second scratch buffer, then horizontal fused with
   normalisation and the cast): separable Gaussian with reflect padding, weights
   precomputed per sample. K taps cover the spec's widest kernel; a sample's weights are
   zero beyond its own radius (2*ceil(3*sigma)+1 taps by default) and those loads are
   masked. Programs of unblurred samples mask every load and store.

The output is one (n_views * B, S, S, 3) buffer, view-major (rows v * B .. v * B + B - 1
are view v), whose NCHW permutation is channels_last: the views of a SimCLR step are
the model's 2B batch as they are written, without a concatenation.

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

# Views of up to _MAX_BLOCK pixels (32 px) are one program each: the contrast means are tl.sums
# over the image in registers. Larger views run _TILE pixels per program, one per thread at 8
# warps: the tile axis fills the SMs, and ptxas keeps the registers at 40-64 per thread (at 4
# pixels per thread it hoists every tap load and takes 140-250, one program per SM).
_MAX_BLOCK = 1024
_TILE = 256


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
def _blend(r, g, b, op, on, bf, cf, sf, mean):
    """Brightness, contrast or saturation (op 0, 1, 2) if `on`: torchvision's _blend(img, target, f)
    with target 0, the mean luma or the luma. Op 3 (hue) or `on` false: f = 1, the identity."""
    f = tl.where(op == 0, bf, tl.where(op == 1, cf, sf))
    f = tl.where(on & (op != 3), f, 1.0)
    gray = _luma(r, g, b)
    target = tl.where(op == 1, mean, tl.where(op == 2, gray, 0.0))
    r = _clamp01(r * f + target * (1.0 - f))
    g = _clamp01(g * f + target * (1.0 - f))
    b = _clamp01(b * f + target * (1.0 - f))
    return r, g, b


@triton.jit
def _jitter_op(r, g, b, op, on, bf, cf, sf, hf, mean, DO_HUE: tl.constexpr):
    """One ColorJitter op (id `op`) if `on`.

    `op` and `on` are per sample, the same for every lane of the program, so this is a
    uniform branch: the HSV round trip runs once per pixel at the one position that holds
    hue, not at all four under a select, and never in a variant compiled without hue.
    """
    if DO_HUE:
        if on & (op == 3):
            r, g, b = _hue_shift(r, g, b, hf)
        else:
            r, g, b = _blend(r, g, b, op, on, bf, cf, sf, mean)
    else:
        r, g, b = _blend(r, g, b, op, on, bf, cf, sf, mean)
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
def _crop(ip_ptr, fp_ptr, row):
    """The resample parameters of one (view, sample) row of the packed params."""
    ip = ip_ptr + row * 13
    fp = fp_ptr + row * 6
    return (tl.load(ip + 0), tl.load(ip + 1), tl.load(ip + 2), tl.load(ip + 3), tl.load(ip + 4),
            tl.load(fp + 4), tl.load(fp + 5))


@triton.jit
def _contrast_luma_kernel(
    src_ptr, part_ptr, ip_ptr, fp_ptr,
    B, stride_b, stride_h, stride_w, stride_c,
    S: tl.constexpr, BLOCK: tl.constexpr, N_TILES: tl.constexpr,
    BICUBIC: tl.constexpr, DO_HUE: tl.constexpr,
):
    """Pre-pass: part[row, tile] = the tile's luma sum of the image as contrast sees it."""
    bi = tl.program_id(0)
    vi = tl.program_id(1)
    ti = tl.program_id(2)
    row = vi * B + bi
    dst = part_ptr + row * N_TILES + ti
    ip = ip_ptr + row * 13
    fp = fp_ptr + row * 6
    if tl.load(ip + 5) != 0:
        top, left, ch, cw, flip, sy, sx = _crop(ip_ptr, fp_ptr, row)
        op0 = tl.load(ip + 8)
        op1 = tl.load(ip + 9)
        op2 = tl.load(ip + 10)
        cpos = tl.load(ip + 12)
        bf = tl.load(fp + 0)
        cf = tl.load(fp + 1)
        sf = tl.load(fp + 2)
        hf = tl.load(fp + 3)
        NPIX: tl.constexpr = S * S
        offs = ti * BLOCK + tl.arange(0, BLOCK)
        mask = offs < NPIX
        r, g, b = _resample(src_ptr, bi.to(tl.int64) * stride_b, stride_h, stride_w, stride_c, offs // S, offs % S,
                            top, left, ch, cw, sy, sx, flip, mask, S, BICUBIC)
        # Only the ops placed before contrast (position cpos) have happened when it takes the mean.
        r, g, b = _jitter_op(r, g, b, op0, cpos > 0, bf, cf, sf, hf, 0.0, DO_HUE)
        r, g, b = _jitter_op(r, g, b, op1, cpos > 1, bf, cf, sf, hf, 0.0, DO_HUE)
        r, g, b = _jitter_op(r, g, b, op2, cpos > 2, bf, cf, sf, hf, 0.0, DO_HUE)
        tl.store(dst, tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0))
    else:
        # The main kernel branches the same way and never reads this row; zero keeps it defined.
        tl.store(dst, 0.0)


@triton.jit
def _simclr_kernel(
    src_ptr, out_ptr, scratch_ptr, part_ptr, ip_ptr, fp_ptr,
    B, stride_b, stride_h, stride_w, stride_c,
    m0, m1, m2, s0, s1, s2,
    S: tl.constexpr, BLOCK: tl.constexpr, N_TILES: tl.constexpr, PARTS: tl.constexpr,
    BICUBIC: tl.constexpr, DO_JITTER: tl.constexpr, DO_HUE: tl.constexpr,
):
    bi = tl.program_id(0)
    vi = tl.program_id(1)
    ti = tl.program_id(2)
    row = vi * B + bi
    ip = ip_ptr + row * 13
    fp = fp_ptr + row * 6
    top, left, ch, cw, flip, sy, sx = _crop(ip_ptr, fp_ptr, row)
    gray = tl.load(ip + 6)
    blur = tl.load(ip + 7)
    NPIX: tl.constexpr = S * S
    if N_TILES == 1:
        # Known offsets let the compiler fold the row/column split (64 instead of 80 registers at 32 px).
        offs = tl.arange(0, BLOCK)
    else:
        offs = ti * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NPIX
    r, g, b = _resample(src_ptr, bi.to(tl.int64) * stride_b, stride_h, stride_w, stride_c, offs // S, offs % S,
                        top, left, ch, cw, sy, sx, flip, mask, S, BICUBIC)
    if DO_JITTER:
        if tl.load(ip + 5) != 0:
            op0 = tl.load(ip + 8)
            op1 = tl.load(ip + 9)
            op2 = tl.load(ip + 10)
            op3 = tl.load(ip + 11)
            bf = tl.load(fp + 0)
            cf = tl.load(fp + 1)
            sf = tl.load(fp + 2)
            hf = tl.load(fp + 3)
            if N_TILES == 1:
                # The whole image is in registers: the contrast mean is the tile's luma at that step.
                mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
                r, g, b = _jitter_op(r, g, b, op0, True, bf, cf, sf, hf, mean, DO_HUE)
                mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
                r, g, b = _jitter_op(r, g, b, op1, True, bf, cf, sf, hf, mean, DO_HUE)
                mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
                r, g, b = _jitter_op(r, g, b, op2, True, bf, cf, sf, hf, mean, DO_HUE)
                mean = tl.sum(tl.where(mask, _luma(r, g, b), 0.0), axis=0) / NPIX
                r, g, b = _jitter_op(r, g, b, op3, True, bf, cf, sf, hf, mean, DO_HUE)
            else:
                # The pre-pass's tile sums; PARTS is N_TILES rounded up to a power of two.
                k = tl.arange(0, PARTS)
                parts = tl.load(part_ptr + row * N_TILES + k, mask=k < N_TILES, other=0.0)
                mean = tl.sum(parts, axis=0) / NPIX
                r, g, b = _jitter_op(r, g, b, op0, True, bf, cf, sf, hf, mean, DO_HUE)
                r, g, b = _jitter_op(r, g, b, op1, True, bf, cf, sf, hf, mean, DO_HUE)
                r, g, b = _jitter_op(r, g, b, op2, True, bf, cf, sf, hf, mean, DO_HUE)
                r, g, b = _jitter_op(r, g, b, op3, True, bf, cf, sf, hf, mean, DO_HUE)
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
    # 48 tap loads and the HSV round trip per pixel: at most a few pixels per thread (1 for _TILE).
    return 4 if block < _TILE else 8


def _block_for(npix: int, block: int | None) -> int:
    if block is not None:
        return block
    if npix <= _MAX_BLOCK:
        return triton.next_power_of_2(npix)
    return _TILE


def simclr_views_stacked(
    images: torch.Tensor, spec: SimCLRSpec, params: list[SimCLRParams], dtype=torch.float32, block: int | None = None
) -> torch.Tensor:
    """All views as one (n_views * B, 3, size, size) channels_last tensor, view-major.

    At most four launches whatever the batch: the contrast pre-pass (views of several
    tiles with jitter on), the fused view kernel, and the two blur passes (blur on).
    `block` overrides the pixel tile (tests use it to get several tiles at tiny sizes).
    """
    b = images.shape[0]
    n_views = len(params)
    s = spec.size
    npix = s * s
    blk = _block_for(npix, block)
    n_tiles = triton.cdiv(npix, blk)
    ip, fp = pack_params(params, spec)
    out = torch.empty((n_views * b, s, s, 3), device=images.device, dtype=dtype)
    do_blur = spec.blur_p > 0
    scratch = torch.empty_like(out, dtype=torch.float32) if do_blur else out
    # pack_params turns jitter off for every sample when jitter_p is 0, and torch_path runs no
    # hue then either: such specs (the RandomResizedCrop weak view) compile without either.
    do_jitter = spec.jitter_p > 0
    do_hue = do_jitter and spec.hue > 0
    bicubic = spec.interpolation == "bicubic"
    m, sd = spec.mean, spec.std
    sb, sh, sw, sc = images.stride()
    grid = (b, n_views, n_tiles)
    if do_jitter and n_tiles > 1:
        partials = torch.empty((n_views * b, n_tiles), device=images.device, dtype=torch.float32)
        _contrast_luma_kernel[grid](
            images, partials, ip, fp, b, sb, sh, sw, sc,
            S=s, BLOCK=blk, N_TILES=n_tiles, BICUBIC=bicubic, DO_HUE=do_hue, num_warps=_warps(blk),
        )
    else:
        partials = fp  # never read: one tile keeps the mean in registers, no jitter needs none
    _simclr_kernel[grid](
        images, out, scratch, partials, ip, fp,
        b, sb, sh, sw, sc,
        m[0], m[1], m[2], sd[0], sd[1], sd[2],
        S=s, BLOCK=blk, N_TILES=n_tiles, PARTS=triton.next_power_of_2(n_tiles),
        BICUBIC=bicubic, DO_JITTER=do_jitter, DO_HUE=do_hue,
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
        # The blur's pixels are independent, so it takes _TILE-pixel programs at every size: at
        # 1024 pixels per program ptxas hoists the K * 3 loads of 4 pixels per thread into 254 registers.
        bblk = block if block is not None else min(blk, _TILE)
        bgrid = (b, n_views, triton.cdiv(npix, bblk))
        common = dict(S=s, K=2 * radius + 1, BLOCK=bblk, num_warps=_warps(bblk))
        _blur_pass[bgrid](scratch, mid, ip, weights, b, m[0], m[1], m[2], sd[0], sd[1], sd[2],
                          VERTICAL=True, FINAL=False, **common)
        _blur_pass[bgrid](mid, out, ip, weights, b, m[0], m[1], m[2], sd[0], sd[1], sd[2],
                          VERTICAL=False, FINAL=True, **common)
    # (N, S, S, 3) contiguous permuted to NCHW is exactly the channels_last layout.
    return out.permute(0, 3, 1, 2)


def simclr_views(
    images: torch.Tensor, spec: SimCLRSpec, params: list[SimCLRParams], dtype=torch.float32, block: int | None = None
) -> list[torch.Tensor]:
    """The views one by one: row blocks of the stacked buffer (channels_last each, no copy)."""
    return list(simclr_views_stacked(images, spec, params, dtype, block).split(images.shape[0]))

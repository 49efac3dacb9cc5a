"""Vectorised PyTorch implementation: the CPU path and the oracle of the Triton kernels.

Images stay NHWC float32 in [0, 1] from the resample to the normalisation, so the final
permute to NCHW is a channels_last view with no copy. Per-sample parameters become
per-sample tap indices and weights (resample, blur) or per-sample blend factors (jitter),
which keeps every step a handful of batched tensor ops instead of a loop over samples.

Two modes, the same results (to fp32 rounding; the tests compare them):
- grouped (CPU): the chain runs on groups of samples whose intermediates fit in cache, and
  ops that only some samples take (hue, blur) run on just those, picked with .nonzero().
- whole batch (CUDA, the fallback when triton is missing): every op runs on the whole
  batch and a torch.where keeps each sample's own result. On a GPU a .nonzero() or a
  kernel size read back with int() stalls the host until the queue drains, and a group
  loop multiplies small launches, so this mode makes no host sync at all. Constants come
  from a per-device cache, never from a host tensor copied over per call.
`GROUPED` (None: auto, grouped on CPU only) or the `grouped=` argument chooses.
"""

from __future__ import annotations

import functools
import math
from dataclasses import fields

import torch

from .params import CONTRAST, HUE, SATURATION, SimCLRParams, WeakParams
from .specs import SimCLRSpec, WeakSpec

# Keys cubic-convolution coefficient of ATen's upsample_bicubic2d.
_CUBIC_A = -0.75
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Bound on the float elements of one intermediate of the resample, to keep 224 px batches in memory.
_CHUNK_ELEMS = 1 << 24
# Float elements of one group of samples run through the whole chain together (cache-sized).
_GROUP_ELEMS = 1 << 18
# None: grouped on CPU, whole batch on other devices; True / False force a mode (tests, benchmarks).
GROUPED: bool | None = None


def _is_grouped(images: torch.Tensor, grouped: bool | None) -> bool:
    if grouped is None:
        grouped = GROUPED
    if grouped is None:
        # Measured faster on CPU (cache-sized groups); every GPU wants whole batches and no syncs.
        grouped = images.device.type == "cpu"
    return grouped


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per device: torch.tensor(list, device=cuda) is a
    host-to-device copy from pageable memory, which waits for the copy on every call. Callers
    only read it."""
    return torch.tensor(values, dtype=dtype, device=device)


# hsv_to_rgb's sector table: which of v, p, q, t each output channel takes in sectors 0..5.
_SECTORS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))


def cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """Weights of taps (-1, 0, 1, 2) at fractional offset t, same formulas as ATen's upsample."""
    a = _CUBIC_A

    def conv1(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def conv2(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack((conv2(t + 1.0), conv1(t), conv1(1.0 - t), conv2(2.0 - t)), dim=-1)


def axis_taps(start: torch.Tensor, length: torch.Tensor, out_size: int, interpolation: str):
    """Source indices (B, out, T) and weights (B, out, T) resizing [start, start+length) to out_size.

    Matches torch.nn.functional.interpolate(align_corners=False, antialias=False) on the
    cropped image: scale = length/out in float32, src = scale*(dst+0.5)-0.5, taps clamped
    to the crop (not to the full image, since torchvision crops before resizing).
    """
    dev = start.device
    scale = length.to(torch.float32) / out_size
    dst = torch.arange(out_size, device=dev, dtype=torch.float32)
    src = scale[:, None] * (dst + 0.5) - 0.5
    last = (length - 1)[:, None]
    if interpolation == "bicubic":
        # ATen's guard_index_and_lambda: index = min(floor(src), len-1), lambda clamped to [0, 1].
        i0 = torch.minimum(src.floor().long(), last)
        t = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
        w = cubic_weights(t)
        offs = torch.arange(-1, 3, device=dev)
    elif interpolation == "bilinear":
        src = src.clamp_min(0.0)  # linear modes clamp negative source coordinates, cubic does not
        i0 = torch.minimum(src.floor().long(), last)
        t = (src - i0.to(torch.float32)).clamp(0.0, 1.0)
        w = torch.stack((1.0 - t, t), dim=-1)
        offs = torch.arange(0, 2, device=dev)
    else:
        raise ValueError(f"unsupported interpolation {interpolation!r}")
    idx = (i0[..., None] + offs).clamp(min=0)
    idx = torch.minimum(idx, last[..., None]) + start[:, None, None]
    return idx, w


def resample(images: torch.Tensor, iy, wy, ix, wx) -> torch.Tensor:
    """Separable resample of uint8 NHWC images with per-sample taps -> float32 NHWC in [0, 1]."""
    b, h, w, c = images.shape
    oh, ow = iy.shape[1], ix.shape[1]
    per_sample = max(h * w * c, oh * w * c, oh * ow * c)
    chunk = max(1, _CHUNK_ELEMS // per_sample)
    # The 1/255 of the uint8 -> [0, 1] conversion rides on the row weights: one multiply
    # per tap instead of one per source pixel and tap.
    wy = wy * (1.0 / 255.0)
    out = torch.empty((b, oh, ow, c), device=images.device, dtype=torch.float32)
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        src = images[s:e].to(torch.float32)
        rows = torch.zeros((e - s, oh, w, c), device=images.device, dtype=torch.float32)
        for k in range(iy.shape[2]):
            rows.addcmul_(src.gather(1, iy[s:e, :, k, None, None].expand(-1, -1, w, c)), wy[s:e, :, k, None, None])
        acc = out[s:e].zero_()
        for k in range(ix.shape[2]):
            acc.addcmul_(rows.gather(2, ix[s:e, None, :, k, None].expand(-1, oh, -1, c)), wx[s:e, None, :, k, None])
    return out


def grayscale(img: torch.Tensor) -> torch.Tensor:
    """Luma of NHWC float images, (..., H, W)."""
    return img[..., 0] * _LUMA[0] + img[..., 1] * _LUMA[1] + img[..., 2] * _LUMA[2]


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb_to_hsv on the last (channel) axis."""
    r, g, b = img.unbind(-1)
    minc, maxc = torch.aminmax(img, dim=-1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    crd = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    max_r = maxc == r
    max_g = (maxc == g) & ~max_r
    max_b = ~max_r & ~(maxc == g)
    h = (bc - gc) * max_r + ((rc + 2.0) - bc) * max_g + ((gc + 4.0) - rc) * max_b
    h = torch.fmod(h * (1.0 / 6.0) + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv_to_rgb on the last axis."""
    h, s, v = hsv.unbind(-1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.to(torch.int64).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = ((1.0 - sxf) * v).clamp_(0.0, 1.0)
    t = ((sxf + one_minus_s) * v).clamp_(0.0, 1.0)
    p = (one_minus_s * v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-1)
    # A gather through the sector table beats where-chains on CPU.
    select = _constant(_SECTORS, torch.int64, hsv.device)
    return vpqt.gather(-1, select[i])


def adjust_hue(img: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift of (N, H, W, 3) images, shift (N,)."""
    hsv = rgb_to_hsv(img)
    h = torch.remainder(hsv[..., 0] + shift[:, None, None], 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[..., 1], hsv[..., 2]), dim=-1))


def color_jitter(img: torch.Tensor, params: SimCLRParams, spec: SimCLRSpec, grouped: bool = True) -> torch.Tensor:
    """ColorJitter in each sample's own order; samples without jitter pass through unchanged.

    Brightness, contrast and saturation are all torchvision's _blend(img, target, f) with
    target 0, the mean luma, or the luma: one batched blend per position of the order,
    with f = 1 for samples whose op at that position is hue or that skip jitter. Hue runs
    on the samples whose op it is (grouped: picked by nonzero; whole batch: all, then where).
    """
    jit = params.jitter
    factors = torch.stack((params.brightness, params.contrast, params.saturation, torch.ones_like(params.hue)), dim=1)
    for pos in range(4):
        op = params.order[:, pos]
        f = factors.gather(1, op[:, None]).squeeze(1)
        f = torch.where(jit & (op != HUE), f, torch.ones_like(f))[:, None, None, None]
        gray = grayscale(img)
        mean = gray.mean(dim=(1, 2), keepdim=True)
        opv = op[:, None, None]
        target = torch.where(opv == CONTRAST, mean, torch.where(opv == SATURATION, gray, torch.zeros_like(gray)))
        img = img.mul(f).add_(target[..., None] * (1.0 - f)).clamp_(0.0, 1.0)
        if spec.hue > 0:
            use = jit & (op == HUE)
            if grouped:
                sel = use.nonzero().squeeze(1)
                if sel.numel():
                    img[sel] = adjust_hue(img[sel], params.hue[sel])
            else:
                # Four HSV round trips over the batch (one per position) instead of one over the
                # samples that take it: the price of no sync, on a device that has the throughput.
                img = torch.where(use[:, None, None, None], adjust_hue(img, params.hue), img)
    return img


def blur_radii(sigma: torch.Tensor, spec: SimCLRSpec) -> torch.Tensor:
    """Per-sample blur radius (int64): kernel_size // 2 of a fixed kernel, else the reference's
    full Gaussian, ceil(3 * sigma) taps each side, capped at spec.blur_radius (<= size - 1).

    The ceil runs in float64 so that the radius is exactly Python's math.ceil(3 * float(sigma)):
    in float32, 3 * sigma can round onto an integer from just above it and lose a tap.
    No host sync: the result stays on sigma's device.
    """
    cap = spec.blur_radius
    if spec.blur_kernel_size > 0:
        return torch.full(sigma.shape, cap, dtype=torch.int64, device=sigma.device)
    return torch.ceil(sigma.to(torch.float64) * 3.0).to(torch.int64).clamp_(0, cap)


def gaussian_kernels(sigma: torch.Tensor, radii: torch.Tensor, radius: int) -> torch.Tensor:
    """(B, 2 * radius + 1) 1-D kernels; row b is torchvision's _get_gaussian_kernel1d(2 * radii[b] + 1,
    sigma[b]) centred in the row, with zeros beyond radii[b] (needs radii <= radius).

    torchvision puts its taps at linspace(-lim, lim, k) with lim = (k - 1) / (2 sqrt 2), i.e.
    tap d at d / sqrt 2, and normalises softmax(-(x / sigma)^2) = exp(-d^2 / (2 sigma^2)) over
    its own k taps. Masking taps beyond a sample's radius to -inf before the softmax gives
    exactly that normalisation in one batched call for samples of different sizes.
    """
    d = torch.arange(-radius, radius + 1, device=sigma.device)
    x = d.to(torch.float32) * (1.0 / math.sqrt(2.0))
    logits = (x[None, :] / sigma[:, None]).pow(2).neg()
    logits = logits.masked_fill(d.abs()[None, :] > radii[:, None], float("-inf"))
    return torch.softmax(logits, dim=1)


def reflect_index(n: int, pad: int, device) -> torch.Tensor:
    """Indices of torch.nn.functional.pad(mode='reflect') along one axis: [-pad, n+pad)."""
    i = torch.arange(-pad, n + pad, device=device).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, radii: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable per-sample blur with reflect padding of (N, H, W, 3) images.

    Sample i is torchvision's gaussian_blur with kernel_size 2 * radii[i] + 1 and sigma[i]:
    all samples run 2 * radius + 1 taps, and the zero weights beyond a sample's own radius
    add exact zeros (the padded values they multiply are finite), so a shared padding of
    `radius` changes nothing. Needs radius < H and W (reflect padding).
    """
    n, h, w, _ = img.shape
    taps = 2 * radius + 1
    k = gaussian_kernels(sigma, radii, radius)
    padded = img[:, reflect_index(h, radius, img.device)]
    out = torch.zeros_like(img)
    for j in range(taps):
        out.addcmul_(padded[:, j : j + h], k[:, j, None, None, None])
    padded = out[:, :, reflect_index(w, radius, img.device)]
    out = torch.zeros_like(img)
    for j in range(taps):
        out.addcmul_(padded[:, :, j : j + w], k[:, j, None, None, None])
    return out


def _normalise_nhwc(img: torch.Tensor, mean, std, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """(img - mean) / std in `dtype`, NHWC -> NCHW channels_last; into `out` (N, H, W, 3) if given."""
    m = _constant(tuple(mean), torch.float32, img.device)
    s = _constant(tuple(std), torch.float32, img.device)
    img = img.sub_(m)
    if out is None:
        return img.div_(s).to(dtype).permute(0, 3, 1, 2)
    # Computed in float32 and rounded once on the store, like .to(dtype): the same values.
    torch.div(img, s, out=out)
    return out.permute(0, 3, 1, 2)


def _slice(params, start: int, stop: int):
    return type(params)(**{f.name: getattr(params, f.name)[start:stop] for f in fields(params)})


def _simclr_chunk(images: torch.Tensor, spec: SimCLRSpec, params: SimCLRParams, grouped: bool) -> torch.Tensor:
    iy, wy = axis_taps(params.top, params.height, spec.size, spec.interpolation)
    ix, wx = axis_taps(params.left, params.width, spec.size, spec.interpolation)
    # A flip after the resize is a reversal of the output columns, i.e. of their taps.
    flip = params.flip[:, None, None]
    ix = torch.where(flip, ix.flip(1), ix)
    wx = torch.where(flip, wx.flip(1), wx)
    # The float path of torchvision's bicubic can overshoot [0, 1]; PIL and uint8 tensors clamp
    # (saturate) here, and so do we, so that jitter sees valid pixel values.
    img = resample(images, iy, wy, ix, wx).clamp_(0.0, 1.0)
    if spec.jitter_p > 0:
        img = color_jitter(img, params, spec, grouped)
    if spec.grayscale_p > 0:
        img = torch.where(params.grayscale[:, None, None, None], grayscale(img)[..., None].expand_as(img), img)
    if spec.blur_p > 0 and not grouped:
        # Every sample through the spec's widest kernel (a constant: no host sync); taps beyond a
        # sample's own radius have weight 0 and add exact zeros, so each blurred sample gets its
        # own kernel, and the where keeps the others as they were.
        radii = blur_radii(params.sigma, spec)
        blurred = gaussian_blur(img, params.sigma, radii, spec.blur_radius)
        img = torch.where(params.blur[:, None, None, None], blurred, img)
    elif spec.blur_p > 0:
        sel = params.blur.nonzero().squeeze(1)
        if sel.numel():
            sigma = params.sigma[sel]
            radii = blur_radii(sigma, spec)
            # nonzero() has synchronised with the host already; running only as many taps as
            # the group's widest kernel needs skips taps that are zero for every sample.
            img[sel] = gaussian_blur(img[sel], sigma, radii, int(radii.max()))
    return img


def simclr_unnormalised(
    images: torch.Tensor, spec: SimCLRSpec, params: SimCLRParams, grouped: bool | None = None
) -> torch.Tensor:
    """The view as float32 NHWC in [0, 1], before normalisation.

    Grouped, runs the whole chain on groups of samples whose intermediates stay around a few
    MB, so the dozens of element-wise passes of the jitter hit cache instead of DRAM. Whole
    batch, one pass of each op over the batch, without host syncs (see the module docstring).
    """
    if not _is_grouped(images, grouped):
        return _simclr_chunk(images, spec, params, grouped=False)
    b = images.shape[0]
    s = spec.size
    group = max(1, _GROUP_ELEMS // (s * s * 3))
    if group >= b:
        return _simclr_chunk(images, spec, params, grouped=True)
    out = torch.empty((b, s, s, 3), device=images.device, dtype=torch.float32)
    for start in range(0, b, group):
        stop = min(b, start + group)
        out[start:stop] = _simclr_chunk(images[start:stop], spec, _slice(params, start, stop), grouped=True)
    return out


def simclr_view(
    images: torch.Tensor, spec: SimCLRSpec, params: SimCLRParams, dtype=torch.float32, *,
    out: torch.Tensor | None = None, grouped: bool | None = None,
) -> torch.Tensor:
    """The normalised view, (B, 3, S, S) channels_last; written into `out` ((B, S, S, 3), `dtype`)
    if given, e.g. one view's rows of a stacked buffer."""
    img = simclr_unnormalised(images, spec, params, grouped)
    return _normalise_nhwc(img, spec.mean, spec.std, dtype, out)


def pad_index(n: int, pad: int, mode: str, device) -> torch.Tensor:
    """Source index of each padded position [-pad, n+pad) for torchvision's padding modes (-1 = fill)."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "reflect":
        i = i.abs()
        return torch.where(i > n - 1, 2 * (n - 1) - i, i)
    if mode == "symmetric":
        i = torch.where(i < 0, -i - 1, i)
        return torch.where(i > n - 1, 2 * n - 1 - i, i)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "constant":
        return torch.where((i < 0) | (i > n - 1), torch.full_like(i, -1), i)
    raise ValueError(f"unsupported padding mode {mode!r}")


def weak_unnormalised(images: torch.Tensor, spec: WeakSpec, params: WeakParams) -> torch.Tensor:
    b, h, w, _ = images.shape
    dev = images.device
    rows = pad_index(h, spec.padding, spec.padding_mode, dev)
    cols = pad_index(w, spec.padding, spec.padding_mode, dev)
    ar = torch.arange(spec.size, device=dev)
    iy = rows[params.top[:, None] + ar]  # (B, S)
    xs = params.left[:, None] + torch.where(params.flip[:, None], spec.size - 1 - ar, ar)
    ix = cols[xs]
    valid = (iy >= 0)[:, :, None] & (ix >= 0)[:, None, :]
    bi = torch.arange(b, device=dev)[:, None, None]
    img = images[bi, iy.clamp_min(0)[:, :, None], ix.clamp_min(0)[:, None, :]].to(torch.float32).mul_(1.0 / 255.0)
    if spec.padding_mode == "constant":
        img = img * valid[..., None]
    return img


def weak_view(images: torch.Tensor, spec: WeakSpec, params: WeakParams, dtype=torch.float32) -> torch.Tensor:
    return _normalise_nhwc(weak_unnormalised(images, spec, params), spec.mean, spec.std, dtype)


def normalize(images: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    return _normalise_nhwc(images.to(torch.float32).mul_(1.0 / 255.0), mean, std, dtype)

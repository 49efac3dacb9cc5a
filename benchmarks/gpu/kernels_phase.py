"""Phase 1, ``kernels``: the fused Triton kernels against their PyTorch twin on CUDA
(interpreted on the CPU in smoke), by the kernels tests' own tolerances
(kernels/tolerances.py): the cases are listed in docs/benchmarks.md."""
from __future__ import annotations

import os

from benchmarks.gpu.common import SIZES, Progress, device, images, mode
from kernels import tolerances


def _dtype(name: str):
    import torch
    return getattr(torch, next(k for k, v in tolerances.DTYPE_NAMES.items() if v == name))


def _unnormalise(v, spec):
    import torch
    m = torch.tensor(spec.mean, device=v.device).view(1, 3, 1, 1)
    s = torch.tensor(spec.std, device=v.device).view(1, 3, 1, 1)
    return v.float() * s + m


def _verdict(out: dict, views, dtype: str, diff: float, tol: float) -> dict:
    """``out`` with the difference, its bound, and whether the views are laid out as promised."""
    import torch
    ok = all(v.dtype == _dtype(dtype) and tuple(v.shape) == (out["batch"], 3, out["size"], out["size"])
             and v.is_contiguous(memory_format=torch.channels_last) for v in views)
    return {**out, "max_abs_diff": diff, "tolerance": tol, "layout_ok": ok, "pass": bool(ok and diff <= tol)}


def _simclr_inputs(dev, batch: int, source: int, spec, seed: int, strided: bool = False):
    from kernels import make_generator, sample_simclr_params
    if strided:  # a column slice of a wider batch: row stride 3 * (source + 8), not 3 * source
        imgs = images(batch, source, source + 8, dev, seed)[:, :, 4:4 + source]
        assert not imgs.is_contiguous()
    else:
        imgs = images(batch, source, source, dev, seed)
    gen = make_generator(seed, 0, 0, 0, dev)
    return imgs, [sample_simclr_params(batch, source, source, spec, gen) for _ in range(2)]


def _simclr_check(dev, batch: int, source: int, size: int, dtype: str, *, seed: int, strided: bool = False,
                  weak: bool = False, twin_device=None, last_rows: int = 0) -> dict:
    import torch
    from engine.settings import DataConfig, WeakViewConfig
    from engine.stages.views import WeakAugment
    from kernels import SimCLRSpec, simclr_views
    # weak: the ImageNet weak view (RandomResizedCrop + flip) exactly as the stages build it.
    spec = WeakAugment(DataConfig(image_size=size), WeakViewConfig(kind="resized_crop")).spec if weak \
        else SimCLRSpec(size=size)
    imgs, params = _simclr_inputs(dev, batch, source, spec, seed, strided)
    fused, _ = simclr_views(imgs, spec, params=params, dtype=_dtype(dtype), impl="triton")
    tdev = twin_device or dev
    twin, _ = simclr_views(imgs.to(tdev), spec, params=[q.to(tdev) for q in params], dtype=torch.float32,
                           impl="torch")
    diffs = [(_unnormalise(f, spec).to(tdev) - _unnormalise(t, spec)).abs() for f, t in zip(fused, twin)]
    out = {"batch": batch, "source": source, "size": size, "dtype": dtype, "strided": strided,
           "twin_device": str(tdev)}
    if last_rows:  # the highest offsets of the batch, where an int32 overflow lands
        out["max_abs_diff_last_rows"] = max(float(d[-last_rows:].max()) for d in diffs)
    return _verdict(out, fused, dtype, max(float(d.max()) for d in diffs), tolerances.SIMCLR[dtype])


def _determinism_check(dev, batch: int, source: int, size: int, seed: int) -> dict:
    import torch
    from kernels import SimCLRSpec, simclr_views
    spec = SimCLRSpec(size=size)
    imgs, params = _simclr_inputs(dev, batch, source, spec, seed)
    first, second = (simclr_views(imgs, spec, params=params, impl="triton")[0] for _ in range(2))
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    return {"batch": batch, "source": source, "size": size, "identical": same, "pass": same}


def _weak_check(dev, batch: int, size: int, padding: int, seed: int) -> dict:
    from kernels import WeakSpec, make_generator, sample_weak_params, weak_view
    spec = WeakSpec(size=size, padding=padding, padding_mode="reflect")
    imgs = images(batch, size, size, dev, seed)
    params = sample_weak_params(batch, size, size, spec, make_generator(seed, 0, 0, 0, dev))
    got, ref = (weak_view(imgs, spec, params=params, impl=b)[0] for b in ("triton", "torch"))
    diff = float((got.float() - ref.float()).abs().max())
    return _verdict({"batch": batch, "size": size, "padding": padding}, [got], "fp32", diff, tolerances.WEAK)


def _normalize_check(dev, batch: int, size: int, dtype: str, seed: int) -> dict:
    import torch
    from kernels import SimCLRSpec, normalize
    spec = SimCLRSpec(size=size)  # only for its mean and std
    imgs = images(batch, size, size, dev, seed)
    got = normalize(imgs, spec.mean, spec.std, dtype=_dtype(dtype), impl="triton")
    ref = normalize(imgs, spec.mean, spec.std, dtype=torch.float32, impl="torch")
    diff = float((_unnormalise(got, spec) - _unnormalise(ref, spec)).abs().max())
    return _verdict({"batch": batch, "size": size, "dtype": dtype}, [got], dtype, diff, tolerances.SIMCLR[dtype])


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """The Triton kernels against the PyTorch twin (on CUDA; interpreted on the CPU in smoke)."""
    import torch
    from kernels import triton_available
    p = Progress(progress, deadline)
    dev = device(smoke)
    s = SIZES[mode(smoke)]["kernels"]
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1",
                  tolerances={"simclr_normalize": tolerances.SIMCLR, "weak": tolerances.WEAK})
    if not triton_available():
        raise RuntimeError("triton is not importable: the fused kernels cannot be checked")
    if smoke:
        p.cuda_only("compiled_kernels", "needs CUDA: here the kernels run under TRITON_INTERPRET=1 (NumPy, "
                                        "program by program), at tiny sizes")
        p.cuda_only("twin_on_cpu", "needs CUDA: the twin runs on the CPU here already (no device twin to tie to it)")
        p.cuda_only("offset_overflow", f"needs CUDA and the full batch of {SIZES['full']['kernels']['overflow']} "
                                       f"at 224 px: the case runs at tiny sizes here, its code path only")
    (bs, ss, vs), (bl, sl, vl) = s["small"], s["large"]
    seed = iter(range(100, 10_000))
    for dt in tolerances.SIMCLR:
        p.case(f"simclr/{vs}px/b{bs}/{dt}", lambda dt=dt: _simclr_check(dev, bs, ss, vs, dt, seed=next(seed)))
    if dev.type == "cuda":  # ties the device twin to the CPU one, itself checked against torchvision
        p.case(f"simclr/{vs}px/b{bs}/fp32/vs_cpu_twin",
               lambda: _simclr_check(dev, bs, ss, vs, "fp32", seed=next(seed), twin_device=torch.device("cpu")))
    for dt in tolerances.SIMCLR:
        p.case(f"simclr/{vl}px_from_{sl}/b{bl}/{dt}", lambda dt=dt: _simclr_check(dev, bl, sl, vl, dt, seed=next(seed)))
    p.case(f"simclr/{vs}px/b{s['strided_small']}/strided",
           lambda: _simclr_check(dev, s["strided_small"], ss, vs, "fp32", seed=next(seed), strided=True))
    p.case(f"simclr/{vl}px_from_{sl}/b{s['strided_large']}/strided",
           lambda: _simclr_check(dev, s["strided_large"], sl, vl, "fp32", seed=next(seed), strided=True))
    for dt in s["overflow_dtypes"]:
        p.case(f"simclr/{vl}px_from_{sl}/b{s['overflow']}/{dt}/offsets",
               lambda dt=dt: _simclr_check(dev, s["overflow"], sl, vl, dt, seed=next(seed), last_rows=8))
    p.case(f"determinism/{vs}px/b{bs}", lambda: _determinism_check(dev, bs, ss, vs, next(seed)))
    p.case(f"determinism/{vl}px_from_{sl}/b{bl}", lambda: _determinism_check(dev, bl, sl, vl, next(seed)))
    p.case(f"weak_pad_crop/{vs}px/b{bs}", lambda: _weak_check(dev, bs, ss, s["padding"], next(seed)))
    p.case(f"weak_resized_crop/{vl}px_from_{sl}/b{bl}",
           lambda: _simclr_check(dev, bl, sl, vl, "fp32", seed=next(seed), weak=True))
    for dt in ("fp32", "bf16"):
        p.case(f"normalize/{vs}px/b{bs}/{dt}", lambda dt=dt: _normalize_check(dev, bs, ss, dt, next(seed)))
    results = p.data["results"]
    p.data["passed"] = bool(results) and not p.data["skipped"] and all(r.get("pass") for r in results.values())
    return p.finish()

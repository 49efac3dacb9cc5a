"""Phase 1, ``kernels``: the fused Triton kernels (CUDA; interpreted on the CPU in smoke)
against their PyTorch twin on the same replayed parameters, by the kernels tests' own
tolerances (kernels/tolerances.py). The cases: docs/benchmarks.md."""
from __future__ import annotations

import os

import torch

from benchmarks.gpu.data import images
from benchmarks.gpu.plan import SIZES, cuda_only, device, mode
from benchmarks.gpu.progress import Progress
from kernels import (SimCLRSpec, WeakSpec, make_generator, normalize, sample_simclr_params, sample_weak_params,
                     simclr_views, tolerances, triton_available, weak_view)

DTYPES = {short: getattr(torch, name) for name, short in tolerances.DTYPE_NAMES.items()}


def spec_of(kind: str, size: int, padding: int):
    if kind == "weak_pad_crop":
        return WeakSpec(size=size, padding=padding, padding_mode="reflect")
    if kind == "weak_resized_crop":  # the ImageNet weak view (RandomResizedCrop + flip) as the stages build it
        from engine.settings import DataConfig, WeakViewConfig
        from engine.stages.views import WeakAugment
        return WeakAugment(DataConfig(image_size=size), WeakViewConfig(kind="resized_crop")).spec
    return SimCLRSpec(size=size)  # for normalize, its mean and std


def view_maker(kind: str, imgs, spec, seed: int):
    """``(impl, dtype, device) -> views`` of ``imgs``, on parameters drawn once for both impls."""
    b, h, w = imgs.shape[:3]
    gen = make_generator(seed, 0, 0, 0, imgs.device)
    if kind == "normalize":
        return lambda impl, dt, d: [normalize(imgs.to(d), spec.mean, spec.std, dtype=DTYPES[dt], impl=impl)]
    if kind == "weak_pad_crop":
        params = sample_weak_params(b, h, w, spec, gen)
        return lambda impl, dt, d: [weak_view(imgs.to(d), spec, params=params, dtype=DTYPES[dt], impl=impl)[0]]
    params = [sample_simclr_params(b, h, w, spec, gen) for _ in range(2)]
    return lambda impl, dt, d: simclr_views(imgs.to(d), spec, params=params, dtype=DTYPES[dt], impl=impl)[0]


def check(dev, kind: str, batch: int, source: int, size: int, seed: int, dtype: str = "fp32", padding: int = 0,
          strided: bool = False, twin_device: str | None = None, last_rows: int = 0, repeat: bool = False) -> dict:
    """The fused views of one case against the twin's (``repeat``: against a second fused run)."""
    spec = spec_of(kind, size, padding)
    if strided:  # a column slice of a wider batch: row stride 3 * (source + 8), not 3 * source
        imgs = images(batch, source, source + 8, dev, seed)[:, :, 4:4 + source]
    else:
        imgs = images(batch, source, source, dev, seed)
    make = view_maker(kind, imgs, spec, seed)
    fused, out = make("triton", dtype, dev), dict(kind=kind, batch=batch, source=source, size=size, dtype=dtype)
    if repeat:
        same = all(torch.equal(a, b) for a, b in zip(fused, make("triton", dtype, dev)))
        return {**out, "identical": same, "pass": same}
    twin_dev = torch.device(twin_device) if twin_device else dev
    # tolerances.py bounds [0, 1] pixels (a normalised difference times std), but the weak view normalised.
    std = 1.0 if kind == "weak_pad_crop" else torch.tensor(spec.std, device=twin_dev).view(1, 3, 1, 1)
    diffs = [(f.to(twin_dev).float() - t.float()).abs() * std for f, t in zip(fused, make("torch", "fp32", twin_dev))]
    if last_rows:  # the highest offsets of the batch, where an int32 overflow lands
        out["max_abs_diff_last_rows"] = max(float(d[-last_rows:].max()) for d in diffs)
    layout_ok = all(v.dtype == DTYPES[dtype] and tuple(v.shape) == (batch, 3, size, size)
                    and v.is_contiguous(memory_format=torch.channels_last) for v in fused)
    diff = max(float(d.max()) for d in diffs)
    tol = tolerances.WEAK if kind == "weak_pad_crop" else tolerances.SIMCLR[dtype]
    return {**out, "twin_device": str(twin_dev), "max_abs_diff": diff, "tolerance": tol, "layout_ok": layout_ok,
            "pass": bool(layout_ok and diff <= tol)}


def cases(s: dict, cuda: bool) -> dict:
    """Case key -> ``check``'s arguments."""
    (bs, ss, vs), (bl, sl, vl) = s["small"], s["large"]
    small, large = dict(kind="simclr", batch=bs, source=ss, size=vs), dict(kind="simclr", batch=bl, source=sl, size=vl)
    sk, lk = f"{vs}px", f"{vl}px_from_{sl}"
    out = {f"simclr/{sk}/b{bs}/{dt}": dict(small, dtype=dt) for dt in tolerances.SIMCLR}
    if cuda:  # ties the device twin to the CPU one, itself checked against torchvision
        out[f"simclr/{sk}/b{bs}/fp32/vs_cpu_twin"] = dict(small, twin_device="cpu")
    out |= {f"simclr/{lk}/b{bl}/{dt}": dict(large, dtype=dt) for dt in tolerances.SIMCLR}
    out[f"simclr/{sk}/b{s['strided_small']}/strided"] = dict(small, batch=s["strided_small"], strided=True)
    out[f"simclr/{lk}/b{s['strided_large']}/strided"] = dict(large, batch=s["strided_large"], strided=True)
    for dt in s["overflow_dtypes"]:
        out[f"simclr/{lk}/b{s['overflow']}/{dt}/offsets"] = dict(large, batch=s["overflow"], dtype=dt, last_rows=8)
    out[f"determinism/{sk}/b{bs}"] = dict(small, repeat=True)
    out[f"determinism/{lk}/b{bl}"] = dict(large, repeat=True)
    out[f"weak_pad_crop/{ss}px/b{bs}"] = dict(small, kind="weak_pad_crop", size=ss, padding=s["padding"])
    out[f"weak_resized_crop/{lk}/b{bl}"] = dict(large, kind="weak_resized_crop")
    for dt in ("fp32", "bf16"):
        out[f"normalize/{ss}px/b{bs}/{dt}"] = dict(small, kind="normalize", size=ss, dtype=dt)
    return out


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    if not triton_available():
        raise RuntimeError("triton is not importable: the fused kernels cannot be checked")
    p, dev = Progress(progress, deadline, cuda_only("kernels", smoke)), device(smoke)
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1")
    for seed, (key, kw) in enumerate(cases(SIZES[mode(smoke)]["kernels"], dev.type == "cuda").items(), start=100):
        p.case(key, lambda kw=kw, seed=seed: check(dev, seed=seed, **kw))
    results = p.data["results"]
    p.data["passed"] = bool(results) and not p.data["skipped"] and all(r.get("pass") for r in results.values())
    return p.finish()

"""``python -m benchmarks gpu --out DIR``: the one prepared check of the GPU path.

Made for one GPU machine with Python, torch and Triton only (no FFCV, no network) and a
10-minute limit: it plans for at most 8 minutes (``CAPS`` + ``GRACE_S``), and nothing
it imports needs FFCV (the data is in memory: ``engine.data.memory``). Four phases:

1. ``kernels``: the fused Triton kernels against their PyTorch twin (``kernels``'
   torch backend) on CUDA: SimCLR views at 32 px (batch 512) and at 224 px from 256 px
   sources, each in fp32, bf16 and fp16; strided (non-contiguous) input; batch 1,024 at
   224 px (where int32 offsets would overflow first); two runs bit-identical; the weak
   views and the evaluation normalisation. Max abs difference on un-normalised pixels
   against the kernels tests' tolerances (``TOL``).
2. ``views``: views/s of the fused kernels, the twin and torchvision v2, each per sample
   (one call per image) and batched (one call per batch), at 32 and 224 px; first,
   images/s of ``data.decode_device: cuda`` (batched nvJPEG, centre crop and resize to
   256, BadNets on 10% on the device) against the CPU path (``decode_jpeg`` on host
   threads, same framing and trigger), on 400x350 JPEGs and on 256 px ones (decode
   geometry).
3. ``steps``: one SimCLR step and one MixMatch step of the real stages
   (``engine.pipeline.make_stage`` over ``MemoryData``) at CIFAR size (CIFAR ResNet-18,
   32 px) and ImageNet size (torchvision ResNet-18, 224 px views from 256 px sources),
   in bf16 and fp32: images/s, share of the measured bf16 matmul peak, host syncs per
   step, peak memory, and the step split into data copy, views and model (CUDA events).
4. ``distributed``: every stage for a few steps through NCCL at world size 1 and through
   gloo with 2 processes on the one GPU, the 2-process losses against the 1-process ones
   at the same global batch.

Each phase runs in a child process of its own (a CUDA fault or a hang cannot take the
others down; the distributed phase's ranks are such children already) under a deadline
it checks between cases, and is killed ``GRACE_S`` after it. A phase child saves its
results after every case, so even a killed phase reports what it finished. The parent
rewrites DIR/gpu.json (atomically) and DIR/gpu.md after every phase.

``--smoke`` (CI, no GPU) runs every phase's code on the CPU at tiny sizes: the kernels
and views phases under ``TRITON_INTERPRET=1``, the steps on the CPU, the 2-process run
over gloo on the CPU. What only CUDA can show is listed under each phase's ``cuda_only``
with the reason.
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.harness import environment, jsonable, measurement, run_child, sync, target

PHASES = ("kernels", "views", "steps", "distributed")
# Seconds per phase. A phase's deadline is cumulative (start + its cap + the caps before
# it), so what an early phase leaves unused goes to the later ones, and the whole check
# ends by start + sum(caps) + GRACE_S (450 s in full mode) whatever happens.
CAPS = {"full": dict(kernels=60, views=70, steps=230, distributed=75),
        "smoke": dict(kernels=120, views=90, steps=150, distributed=150)}
GRACE_S = 15  # past its deadline by this much, a phase's child is killed

# The kernels tests' tolerances (tests/kernels/test_kernels_triton.py, TOL and test_weak),
# on [0, 1] pixels after un-normalising: fp32 is rounding-level; half types are bounded
# by one output ulp at |normalised| < 4 times std. The weak view is compared normalised.
TOL = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 5e-3}
WEAK_TOL = 1e-6
# 1 vs 2 processes, SimCLR, as tests/runtime/test_launchers.py compares them (CROSS): the
# first steps within CROSS_TOL, where a wrong shard, gradient scale or unsynchronised
# BatchNorm shows at the 1e-1 level (step 0 checks the forward, step 1 the first update);
# later steps only within CROSS_LATER_TOL, since fp32 rounding differences of the two
# summation orders grow fast in these small nets (width 4 on random data, CPU: 0 and
# 8e-7 at steps 0 and 1, 3e-3 at step 2).
CROSS_TOL, CROSS_FIRST, CROSS_LATER_TOL = 1e-4, 2, 1.5e-1

SIZES = {
    "full": dict(
        kernels=dict(small=(512, 32, 32), large=(256, 256, 224), strided_small=512, strided_large=64,
                     overflow=1024, overflow_dtypes=("fp32", "bf16"), padding=4),
        views=dict(sizes={"32px": (32, 32), "224px": (256, 224)}, batch=512, per_sample=64, reps=5,
                   per_sample_reps=3),
        # data.decode_device: JPEG bytes of (height, width) photos decoded and framed at
        # decode_size, 10% triggered (BadNets), cuda against the CPU path.
        decode=dict(source=(350, 400), decode_size=256, batch=256, reps=3, poisoned=0.1),
        # (family, stage, arch, width, view size, source size, batch): the stage's own
        # batch_size (MixMatch: labelled, plus as many unlabelled).
        steps=dict(warmup=3, timed={"cifar": 10, "imagenet": 5}, cases=(
            ("cifar", "pretrain", "cifar_resnet18", 64, 32, 32, 512),
            ("cifar", "finetune", "cifar_resnet18", 64, 32, 32, 64),
            ("imagenet", "pretrain", "resnet18", 64, 224, 256, 256),
            ("imagenet", "finetune", "resnet18", 64, 224, 256, 256),
            ("cifar", "finetune", "cifar_resnet18", 64, 32, 32, 256))),
        distributed=dict(width=64, n_train=512, batch=128, finetune_batch=32, steps=3),
    ),
    "smoke": dict(
        # 7 px views from 9 px sources are one tile; 33 px views (1,089 pixels) are two,
        # which takes the contrast pre-pass and the tiled blur like 224 px does. The
        # interpreter runs program by program (about 1 s per 33 px image and view), so the
        # batches are as small as still say something: several images where offsets and
        # strides between images matter.
        kernels=dict(small=(4, 9, 7), large=(1, 40, 33), strided_small=4, strided_large=2, overflow=3,
                     overflow_dtypes=("fp32",), padding=2),
        # Timing needs no second tile: both sizes are one (the kernels phase checks the tiled path).
        views=dict(sizes={"8px": (8, 8), "16px": (20, 16)}, batch=2, per_sample=1, reps=1, per_sample_reps=1),
        decode=dict(source=(35, 40), decode_size=32, batch=4, reps=1, poisoned=0.5),
        steps=dict(warmup=1, timed={"cifar": 2, "imagenet": 2}, cases=(
            ("cifar", "pretrain", "cifar_resnet18", 4, 32, 32, 16),
            ("cifar", "finetune", "cifar_resnet18", 4, 32, 32, 8),
            ("imagenet", "pretrain", "resnet18", 64, 64, 72, 4),
            ("imagenet", "finetune", "resnet18", 64, 64, 72, 4),
            ("cifar", "finetune", "cifar_resnet18", 4, 32, 32, 16))),
        distributed=dict(width=4, n_train=64, batch=16, finetune_batch=8, steps=3),
    ),
}


def dist_stages() -> tuple[str, ...]:
    """Every registered stage, each after those it needs (the registry: a new defense's
    stages are checked without editing this file)."""
    from engine.stages.base import stages_in_order

    return stages_in_order()

# Stages whose step is the same computation on 1 and on N processes (views drawn for the
# global batch, engine/defenses/dbd/pretrain.py); the others draw their views per rank.
RANK_INVARIANT = ("pretrain",)
CLASSES = 10
IMAGENET_NORM = ["data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]"]


def _mode(smoke: bool) -> str:
    return "smoke" if smoke else "full"


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _ffcv_importable() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def _ffcv_loaded() -> bool:
    import sys

    return any(m == "ffcv" or m.startswith("ffcv.") for m in sys.modules)


class _Progress:
    """A phase's results as they come, saved atomically after every case, so a phase
    killed at its time cap still reports the cases it finished. ``case`` runs one case
    unless the deadline is too close, and records its error instead of raising."""

    def __init__(self, path: str | None, deadline: float):
        self.path, self.deadline = path, deadline
        self.data: dict = {"results": {}, "skipped": {}, "cuda_only": {}, "notes": []}
        self.last = 0.0  # seconds of the latest case
        self.took: dict[str, float] = {}  # seconds of the latest case of each kind

    def save(self) -> None:
        if self.path:
            from engine.fsutil import write_json

            write_json(self.path, jsonable(self.data))

    def cuda_only(self, what: str, why: str) -> None:
        self.data["cuda_only"][what] = why

    def case(self, key: str, fn, kind: str | None = None):
        """Run ``fn`` as case ``key`` unless the deadline is nearer than the time the last
        case of the same ``kind`` took (or, for a first one, the last case of any kind)."""
        est = self.took.get(kind, self.last)
        left = self.deadline - time.time()
        if est > left:
            self.data["skipped"][key] = (f"phase time cap: {max(left, 0):.0f} s left, the case would take about "
                                         f"{est:.0f} s")
            self.save()
            return None
        t0 = time.time()
        try:
            value = fn()
        except Exception as e:  # one broken case must not hide the others
            value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        if isinstance(value, dict) and "error" in value:
            _free_memory()  # out here, where the failed case's frames (and tensors) are gone
        self.last = self.took[kind] = time.time() - t0
        if isinstance(value, dict):
            value.setdefault("seconds", round(self.last, 2))
        self.data["results"][key] = value
        self.save()
        return value

    def finish(self) -> dict:
        self.data["ffcv_loaded"] = _ffcv_loaded()
        self.data["ffcv_importable"] = _ffcv_importable()
        self.save()
        return self.data


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _device(smoke: bool):
    import torch

    if smoke:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the gpu check needs one (--smoke runs its CPU path)")
    return torch.device("cuda", 0)


def _images(batch: int, h: int, w: int, device, seed: int):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device, generator=g)


def _unnormalise(v, spec):
    import torch

    m = torch.tensor(spec.mean, device=v.device).view(1, 3, 1, 1)
    s = torch.tensor(spec.std, device=v.device).view(1, 3, 1, 1)
    return v.float() * s + m


def _layout_ok(views, batch: int, size: int, dtype) -> bool:
    import torch

    return all(v.dtype == dtype and tuple(v.shape) == (batch, 3, size, size)
               and v.is_contiguous(memory_format=torch.channels_last) for v in views)


# =========================================================================== 1. kernels


def _weak_resized_spec(size: int):
    """The ImageNet weak view (RandomResizedCrop + flip) exactly as the stages build it."""
    from engine.settings import DataConfig, WeakViewConfig
    from engine.stages.views import WeakAugment

    return WeakAugment(DataConfig(image_size=size), WeakViewConfig(kind="resized_crop")).spec


def _simclr_check(dev, batch: int, source: int, size: int, dtype: str, *, seed: int, strided: bool = False,
                  weak: bool = False, twin_device=None, last_rows: int = 0) -> dict:
    import torch

    from kernels import SimCLRSpec, make_generator, sample_simclr_params, simclr_views

    spec = _weak_resized_spec(size) if weak else SimCLRSpec(size=size)
    if strided:  # a column slice of a wider batch: row stride 3 * (source + 8), not 3 * source
        images = _images(batch, source, source + 8, dev, seed)[:, :, 4:4 + source]
        assert not images.is_contiguous()
    else:
        images = _images(batch, source, source, dev, seed)
    gen = make_generator(seed, 0, 0, 0, dev)
    params = [sample_simclr_params(batch, source, source, spec, gen) for _ in range(2)]
    fused, _ = simclr_views(images, spec, params=params, dtype=_dtype(dtype), backend="triton")
    tdev = twin_device or dev
    twin, _ = simclr_views(images.to(tdev), spec, params=[q.to(tdev) for q in params], dtype=torch.float32,
                           backend="torch")
    diffs = [(_unnormalise(f, spec).to(tdev) - _unnormalise(t, spec)).abs() for f, t in zip(fused, twin)]
    diff = max(float(d.max()) for d in diffs)
    ok = _layout_ok(fused, batch, size, _dtype(dtype))
    out = {"batch": batch, "source": source, "size": size, "dtype": dtype, "strided": strided,
           "twin_device": str(tdev), "max_abs_diff": diff, "tolerance": TOL[dtype], "layout_ok": ok,
           "pass": bool(ok and diff <= TOL[dtype])}
    if last_rows:  # the highest offsets of the batch, where an int32 overflow lands
        out["max_abs_diff_last_rows"] = max(float(d[-last_rows:].max()) for d in diffs)
    return out


def _determinism_check(dev, batch: int, source: int, size: int, seed: int) -> dict:
    import torch

    from kernels import SimCLRSpec, make_generator, sample_simclr_params, simclr_views

    spec = SimCLRSpec(size=size)
    images = _images(batch, source, source, dev, seed)
    gen = make_generator(seed, 0, 0, 0, dev)
    params = [sample_simclr_params(batch, source, source, spec, gen) for _ in range(2)]
    first, _ = simclr_views(images, spec, params=params, backend="triton")
    second, _ = simclr_views(images, spec, params=params, backend="triton")
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    return {"batch": batch, "source": source, "size": size, "identical": same, "pass": same}


def _weak_check(dev, batch: int, size: int, padding: int, seed: int) -> dict:
    import torch

    from kernels import WeakSpec, make_generator, sample_weak_params, weak_view

    spec = WeakSpec(size=size, padding=padding, padding_mode="reflect")
    images = _images(batch, size, size, dev, seed)
    params = sample_weak_params(batch, size, size, spec, make_generator(seed, 0, 0, 0, dev))
    got, _ = weak_view(images, spec, params=params, backend="triton")
    ref, _ = weak_view(images, spec, params=params, backend="torch")
    diff = float((got.float() - ref.float()).abs().max())
    ok = _layout_ok([got], batch, size, torch.float32)
    return {"batch": batch, "size": size, "padding": padding, "max_abs_diff": diff, "tolerance": WEAK_TOL,
            "layout_ok": ok, "pass": bool(ok and diff <= WEAK_TOL)}


def _normalize_check(dev, batch: int, size: int, dtype: str, seed: int) -> dict:
    import torch

    from kernels import SimCLRSpec, normalize

    spec = SimCLRSpec(size=size)  # only for its mean and std
    images = _images(batch, size, size, dev, seed)
    got = normalize(images, spec.mean, spec.std, dtype=_dtype(dtype), backend="triton")
    ref = normalize(images, spec.mean, spec.std, dtype=torch.float32, backend="torch")
    diff = float((_unnormalise(got, spec) - _unnormalise(ref, spec)).abs().max())
    ok = _layout_ok([got], batch, size, _dtype(dtype))
    return {"batch": batch, "size": size, "dtype": dtype, "max_abs_diff": diff, "tolerance": TOL[dtype],
            "layout_ok": ok, "pass": bool(ok and diff <= TOL[dtype])}


def phase_kernels(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """The Triton kernels against the PyTorch twin (on CUDA; interpreted on the CPU in smoke)."""
    import torch

    from kernels import triton_available

    p = _Progress(progress, deadline)
    dev = _device(smoke)
    s = SIZES[_mode(smoke)]["kernels"]
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1",
                  tolerances={"simclr_normalize": TOL, "weak": WEAK_TOL})
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
    for dt in TOL:
        p.case(f"simclr/{vs}px/b{bs}/{dt}", lambda dt=dt: _simclr_check(dev, bs, ss, vs, dt, seed=next(seed)))
    if dev.type == "cuda":  # ties the device twin to the CPU one, itself checked against torchvision
        p.case(f"simclr/{vs}px/b{bs}/fp32/vs_cpu_twin",
               lambda: _simclr_check(dev, bs, ss, vs, "fp32", seed=next(seed), twin_device=torch.device("cpu")))
    for dt in TOL:
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


# =========================================================================== 2. views


def _per_sample(make, images, spec, n: int):
    calls = [make(images[i:i + 1], spec) for i in range(n)]
    return lambda: [c() for c in calls]


def _view_methods(images, spec, n: int, fused: bool) -> dict:
    """method/mode -> (fn making two views per image, images it handles, warm-up fn)."""
    from benchmarks import augment

    out = {}
    if fused:
        out["fused/batched"] = (augment._fused(images, spec), len(images), None)
        out["fused/per_sample"] = (_per_sample(augment._fused, images, spec, n), n, None)
    out["torch_path/batched"] = (augment._torch_path(images, spec), len(images), None)
    out["torch_path/per_sample"] = (_per_sample(augment._torch_path, images, spec, n), n, None)
    # torchvision has nothing to compile or specialise: a few images warm it up.
    out["torchvision_v2/per_sample"] = (augment._torchvision_v2(images[:n], spec), n,
                                        augment._torchvision_v2(images[:2], spec))
    pipe = augment.torchvision_v2_pipe(spec)
    chw = images.permute(0, 3, 1, 2)
    # One call per view for the whole batch: torchvision draws one set of parameters per
    # call, so every image of a view gets the same crop and colours (less work than the
    # per-sample views it stands in for; the fastest torchvision can be).
    out["torchvision_v2/batched"] = (lambda: [pipe(chw) for _ in range(2)], len(images), None)
    return out


def _jpeg_batch(n: int, height: int, width: int, seed: int) -> list:
    """JPEG bytes of smooth random images (photo-like, so they compress as photos do)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, height // 16), max(2, width // 16), generator=g)
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, height, width, generator=g) * 0.1
    images = ((smooth + noise).clamp(0, 1) * 255).to(torch.uint8)
    return [encode_jpeg(img, quality=90) for img in images]


def _decode_cases(p: "_Progress", dev, smoke: bool) -> None:
    """data.decode_device: images/s of decode + framing + trigger on ``dev`` (nvJPEG on
    CUDA) against the CPU path (decode_jpeg on host threads, the same framing and
    trigger on the host), at source resolution and at decode geometry."""
    import numpy as np
    import torch

    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig
    from engine.attacks.device import device_twin
    from engine.data.gpu_decode import decode_batch

    s = SIZES[_mode(smoke)]["decode"]
    (h, w), size, batch = s["source"], s["decode_size"], s["batch"]
    twin = device_twin(BadNets.from_config(BadNetsConfig()))
    selected = np.random.default_rng(0).random(batch) < s["poisoned"]
    threads = max(1, min(16, os.cpu_count() or 1))
    pool = ThreadPoolExecutor(threads)
    cpu = torch.device("cpu")

    def cpu_path(jpegs):
        # decode_jpeg on the CPU is one image after another: a thread per share of the batch.
        chunks = [list(range(k, len(jpegs), threads)) for k in range(threads)]
        parts = list(pool.map(lambda c: decode_batch([jpegs[i] for i in c], size=size, ratio=1.0, device=cpu)
                              if c else None, chunks))
        images = torch.empty(len(jpegs), size, size, 3, dtype=torch.uint8)
        for c, part in zip(chunks, parts):
            if c:
                images[c] = part
        return twin.apply_selected(images, torch.arange(len(jpegs)), torch.from_numpy(selected))

    def device_path(jpegs):
        images = decode_batch(jpegs, size=size, ratio=1.0, device=dev)
        return twin.apply_selected(images, torch.arange(len(jpegs), device=dev),
                                   torch.from_numpy(selected).to(dev))

    p.data["decode_settings"] = {**s, "cpu_threads": threads, "trigger": "badnets white3x3"}
    for label, (sh, sw) in ((f"{h}x{w}_to_{size}", (h, w)), (f"{size}_stored", (size, size))):
        jpegs = _jpeg_batch(batch, sh, sw, seed=sh)
        outs = {}
        for name, fn, d in (("device", device_path, dev), ("cpu", cpu_path, cpu)):
            def timed(fn=fn, d=d, name=name):
                outs[name] = fn(jpegs).cpu().int()  # also the warm-up: nvJPEG's handles, the twin's tables
                sync(d)
                rates = []
                for _ in range(s["reps"]):
                    t0 = time.perf_counter()
                    fn(jpegs)
                    sync(d)
                    rates.append(len(jpegs) / (time.perf_counter() - t0))
                return {"unit": "images/s", "images": len(jpegs), "device": str(d), **measurement("images/s", rates)}

            p.case(f"decode/{label}/{name}", timed, kind="decode")
        if len(outs) == 2 and "median" in p.data["results"].get(f"decode/{label}/cpu", {}):
            # nvJPEG against libjpeg, the same framing and trigger: pixels may differ by a level or so.
            diff = (outs["device"] - outs["cpu"]).abs()
            p.data["results"][f"decode/{label}/cpu"].update(max_abs_diff_vs_device=int(diff.max()),
                                                           mean_abs_diff_vs_device=float(diff.float().mean()))
        dv, cp = (p.data["results"].get(f"decode/{label}/{k}", {}).get("median") for k in ("device", "cpu"))
        if dv and cp:
            p.data.setdefault("decode_ratios", {})[f"decode/{label}/device_vs_cpu"] = dv / cp
        p.save()
    pool.shutdown()
    _trigger_twin_cases(p, dev, size, batch, s["reps"])


def _trigger_twin_cases(p: "_Progress", dev, size: int, batch: int, reps: int) -> None:
    """data.trigger_device=device: each attack's device twin on a batch of ``size`` px
    frames, every image triggered (WaNet: half of them noise-mode), in images/s. On a GPU
    this is what the CPU loader saves per triggered image (benchmarks loader times the
    same twins on the CPU)."""
    import numpy as np
    import torch

    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig
    from engine.attacks.triggers.blended import Blended, BlendedConfig, make_pattern
    from engine.attacks.device import device_twin
    from engine.attacks.triggers.sig import SIG, SIGConfig
    from engine.attacks.triggers.wanet import WaNet, WaNetConfig

    frame = (size, size)
    blended = BlendedConfig()
    attacks = {"badnets": BadNets.from_config(BadNetsConfig()),
               "blended": Blended(make_pattern(blended.pattern, frame, blended.pattern_seed, blended.resample),
                                  blended.alpha),
               "sig": SIG(size, SIGConfig().delta, SIGConfig().f),
               "wanet": WaNet.build(WaNetConfig(), frame, noise=np.arange(batch) % 2 == 0)}
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    images = images.to(dev)
    positions = torch.arange(batch, device=dev)
    for name, attack in attacks.items():
        twin = device_twin(attack)

        def timed(twin=twin):
            twin(images.clone(), positions)  # warm-up: the twin's tables on the device
            sync(dev)
            rates = []
            for _ in range(max(reps, 3)):
                x = images.clone()
                sync(dev)
                t0 = time.perf_counter()
                twin(x, positions)
                sync(dev)
                rates.append(batch / (time.perf_counter() - t0))
            return {"unit": "images/s", "images": batch, "frame": size, "device": str(dev),
                    **measurement("images/s", rates)}

        p.case(f"trigger_twin/{name}/{size}px", timed, kind="decode")
    p.save()


def phase_views(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """views/s: fused Triton, the PyTorch twin and torchvision v2, per sample and batched."""
    from kernels import SimCLRSpec, triton_available

    p = _Progress(progress, deadline)
    dev = _device(smoke)
    s = SIZES[_mode(smoke)]["views"]
    fused = triton_available()
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1",
                  settings={k: v for k, v in s.items() if k != "sizes"}, sizes=s["sizes"])
    if smoke:
        p.cuda_only("fused_speed", "needs CUDA: the fused kernels run interpreted here (TRITON_INTERPRET=1), "
                                   "so their figures time the interpreter, not the kernels")
        p.cuda_only("target", "needs CUDA: fused >= 10x torchvision v2 is a GPU target")
    if not fused:
        p.data["notes"].append("triton is not importable: no fused figures")
    # First: a few seconds, and the figure the GPU decode (data.decode_device) has none of yet.
    if smoke:
        p.cuda_only("decode_speed", "needs CUDA: nvJPEG; here both decode paths run on the CPU, tiny")
    _decode_cases(p, dev, smoke)
    for label, (source, size) in s["sizes"].items():
        spec = SimCLRSpec(size=size)
        images = _images(s["batch"], source, source, dev, seed=len(label))
        for key, (fn, n, warm) in _view_methods(images, spec, s["per_sample"], fused).items():
            reps = s["per_sample_reps"] if key.endswith("per_sample") else s["reps"]

            def timed(fn=fn, n=n, warm=warm, reps=reps):
                # Warm-up at the timed batch: Triton specialises the compiled kernel on it.
                (warm or fn)()
                sync(dev)
                rates = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    fn()
                    sync(dev)
                    rates.append(2 * n / (time.perf_counter() - t0))
                    if time.time() > p.deadline:
                        break
                return {"unit": "views/s", "images": n, **measurement("views/s", rates)}

            p.case(f"{label}/{key}", timed)
        del images
        _free_memory()
    res = p.data["results"]
    ratios, targets = {}, []
    for label in s["sizes"]:
        for mode in ("batched", "per_sample"):
            f = res.get(f"{label}/fused/{mode}", {}).get("median")
            for other in ("torch_path", "torchvision_v2"):
                o = res.get(f"{label}/{other}/{mode}", {}).get("median")
                if f and o:
                    ratios[f"{label}/{mode}/fused_vs_{other}"] = f / o
        # augment's convention: the fused batch against torchvision per sample (the reference way).
        f, o = (res.get(f"{label}/{k}", {}).get("median") for k in ("fused/batched", "torchvision_v2/per_sample"))
        if f and o:
            ratios[f"{label}/fused_batched_vs_torchvision_v2_per_sample"] = f / o
            if not smoke:
                targets.append(target(f"fused SimCLR views vs torchvision v2 per sample at {label}", f / o, ">=", 10.0))
    p.data.update(ratios=ratios, targets=targets)
    return p.finish()


# =========================================================================== 3. steps


def _memory_data(cfg, dist, n: int, source: int, seed: int = 1234):
    """In-memory uint8 data for the stages. ``source`` > data.image_size: the ImageNet
    presets decode JPEGs at data.decode_size (256) and cut their 224 px views on the
    device; MemoryData checks that its images are at the training size, so the larger
    sources replace its training images after that check (the test images stay at the
    training size, which is what evaluation reads)."""
    import torch

    from engine.data.memory import MemoryData

    g = torch.Generator().manual_seed(seed)
    size = cfg.data.image_size
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    test_n = 8
    data = MemoryData(cfg.data, dist, cfg.seed,
                      train=(torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g), labels),
                      test=(torch.randint(0, 256, (test_n, size, size, 3), dtype=torch.uint8, generator=g),
                            torch.arange(test_n) % CLASSES), num_classes=CLASSES)
    if source != size:
        data.images = torch.randint(0, 256, (n, source, source, 3), dtype=torch.uint8, generator=g)
    return data


def _tensors(batch) -> list:
    import torch

    if torch.is_tensor(batch):
        return [batch]
    return [t for b in batch for t in _tensors(b)]


def _map(batch, fn):
    import torch

    if torch.is_tensor(batch):
        return fn(batch)
    return type(batch)(_map(b, fn) for b in batch)


class _Marks:
    """Points on the device's timeline: CUDA events on a GPU (no host sync to take them),
    perf_counter on the CPU (where every op has finished when it returns)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        import torch

        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def _flops_estimate(stage: str, arch: str, size: int, width: int, per_rank: int, k_views: int) -> float:
    """FLOPs of one step by benchmarks/flops.py (convolutions and matmuls of the model)."""
    from benchmarks.flops import count

    if stage == "pretrain":  # two views per image through backbone + projection head
        return 2 * per_rank * count(arch, size, head="simclr", width=width)["forward_backward"]
    c = count(arch, size, width=width)
    # Label guessing (K forwards of the unlabelled batch, no grad), then forward and
    # backward over the labelled batch and its K unlabelled views; the linear head is
    # left out (under 0.1 % of the backbone).
    return k_views * per_rank * c["forward"] + (1 + k_views) * per_rank * c["forward_backward"]


def _step_config(case, precision: str, device: str, run_dir: Path, extra=()):
    from engine.config import load_config

    family, stage, arch, width, size, source, batch = case
    over = [f"device={device}", "logging.progress=false", "attack.name=none", f"model.arch={arch}",
            f"model.width={width}", f"data.image_size={size}", f"precision={precision}", f"run_dir={run_dir}"]
    over.append(f"pretrain.batch_size={batch}" if stage == "pretrain" else f"finetune.batch_size={batch}")
    if family == "imagenet":
        over += [f"data.decode_size={source}", "finetune.view.kind=resized_crop", *IMAGENET_NORM]
    return load_config(None, over + list(extra))


def _time_step(case, precision: str, s: dict, dist, peak: float, work: Path) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks import stages
    from engine.runtime.host_sync import HostSyncCounter

    family, name, arch, width, size, source, batch = case
    dev = dist.device
    cuda = dev.type == "cuda"
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    cfg = _step_config(case, precision, dev.type, run_dir)
    # One global batch for SimCLR; MixMatch splits the set in halves (epsilon 0.5), each
    # at least one global batch.
    data = _memory_data(cfg, dist, batch if name == "pretrain" else 2 * batch, source)
    stage = stages.build(cfg, name, run_dir, dist, data)
    stage.on_epoch_start(0)  # MixMatch: the split (one eval pass over the set) and its loaders
    batches = iter(stage.batches(0))
    first = next(batches)
    getattr(batches, "close", lambda: None)()
    # The engine's CUDA loaders deliver pinned host batches copied without blocking
    # (ToDevice): the same batch, pinned once, is copied again at every step.
    host = _map(first, lambda t: t.pin_memory()) if cuda else first
    copy_bytes = sum(t.numel() * t.element_size() for t in _tensors(host))

    def copy(host=host):
        return _map(host, lambda t: t.to(dev, non_blocking=True))

    warm, timed = s["warmup"], s["timed"][family]
    t0 = time.perf_counter()
    for k in range(warm):  # at the timed batch: Triton compiles, cuDNN picks its algorithms
        stage.update(stage.prepare(copy(), 0, k), 0, k)
    sync(dev)
    warmup_s = time.perf_counter() - t0
    with HostSyncCounter() as syncs, FlopCounterMode(display=False) as flops:
        out = stage.update(stage.prepare(copy(), 0, warm), 0, warm)
    loss = float(out["loss"])
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    marks, clock = [], _Marks(dev)
    sync(dev)
    w0 = time.perf_counter()
    for k in range(warm + 1, warm + 1 + timed):
        m0 = clock.mark()
        on_device = copy()
        m1 = clock.mark()
        x = stage.prepare(on_device, 0, k)  # its own .to(device) is a no-op on device tensors
        m2 = clock.mark()
        stage.update(x, 0, k)
        marks.append((m0, m1, m2, clock.mark()))
    sync(dev)
    wall = time.perf_counter() - w0
    parts = [[clock.seconds(m[i], m[i + 1]) for i in range(3)] for m in marks]
    ips = stage.images_per_step
    per_rank = getattr(stage, "per_rank", None) or stage.plan.per_rank
    k_views = getattr(stage.config, "k_views", 2)
    step_flops = float(flops.get_total_flops())
    rate = ips * timed / wall
    total = sum(map(sum, parts))
    result = {
        "family": family, "stage": name, "kind": "simclr" if name == "pretrain" else "mixmatch", "arch": arch,
        "width": width, "image_size": size, "source_size": source, "batch": batch, "precision": precision,
        "images_per_step": ips, "warmup_steps": warm, "timed_steps": timed, "warmup_s": warmup_s,
        "images_per_s": rate, "images_per_s_by_step": [ips / sum(x) for x in parts],
        "step_ms": statistics.median(sum(x) for x in parts) * 1e3,
        "split_ms": {k: statistics.median(x[i] for x in parts) * 1e3 for i, k in enumerate(("copy", "views", "model"))},
        "split_share": {k: sum(x[i] for x in parts) / total for i, k in enumerate(("copy", "views", "model"))},
        "copy_bytes": copy_bytes,
        "copy_gb_per_s": copy_bytes / max(statistics.median(x[0] for x in parts), 1e-9) / 1e9 if cuda else None,
        "flops_per_step": step_flops,
        "flops_per_step_flops_py": _flops_estimate(name, arch, size, width, per_rank, k_views),
        "bf16_peak_share": rate * (step_flops / ips) / peak,
        "host_syncs_per_step": len(syncs), "host_syncs": syncs.summary(),
        "peak_memory_gib": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None,
        "loss": loss, "loss_finite": math.isfinite(loss),
    }
    del stage, data, host, first, copy
    _free_memory()
    return result


def phase_steps(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """One SimCLR and one MixMatch step of the real stages, CIFAR and ImageNet size, bf16 and fp32."""
    import torch

    from benchmarks.step import matmul_ceiling
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown

    p = _Progress(progress, deadline)
    s = SIZES[_mode(smoke)]["steps"]
    dev = _device(smoke)
    base = load_config(None, [f"device={dev.type}", "logging.progress=false", "attack.name=none"])
    dist = init_distributed(base.device, base.distributed)  # cuDNN autotuning and TF32 as a run sets them
    # The ceiling the shares refer to: the best of three measurements of a large bf16 matmul.
    peak = max(matmul_ceiling(dist.device, "bf16", quick=smoke) for _ in range(3))
    p.data.update(device=str(dist.device), bf16_matmul_peak_flops=peak,
                  settings={"warmup": s["warmup"], "timed": s["timed"],
                            "cases": [dict(zip(("family", "stage", "arch", "width", "size", "source", "batch"), c))
                                      for c in s["cases"]],
                            "cudnn_benchmark": torch.backends.cudnn.benchmark,
                            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "data": "MemoryData, random uint8"})
    if dev.type != "cuda":
        p.cuda_only("peak_memory", "needs CUDA (torch.cuda.max_memory_allocated)")
        p.cuda_only("data_copy", "needs CUDA: no host-to-device copy on the CPU (its share is the no-op .to)")
        p.cuda_only("cuda_events", "needs CUDA: the split is timed with perf_counter on the CPU")
        p.cuda_only("bf16_peak", "needs CUDA: the peak here is the CPU's bf16 matmul, not a GPU's")
    work = Path(tempfile.mkdtemp(prefix="dbd-gpu-steps-"))
    try:
        for precision in ("bf16", "fp32"):
            for case in s["cases"]:
                family, name, _, _, size, _, batch = case
                key = f"{family}{size}/{'simclr' if name == 'pretrain' else 'mixmatch'}/b{batch}/{precision}"
                p.case(key, lambda case=case, precision=precision: _time_step(case, precision, s, dist, peak, work),
                       kind=f"{family}/{name}/{batch}")
    finally:
        shutdown()
    return p.finish()


# =========================================================================== 4. distributed


def _dist_stage(cfg, name: str, run_dir: Path, dist, data, steps: int) -> dict:
    from benchmarks import stages

    stage = stages.build(cfg, name, run_dir, dist, data)
    stage.on_epoch_start(0)
    losses = []
    batches = iter(stage.batches(0))
    try:
        for k in range(steps):
            out = stage.train_step(next(batches), 0, k)
            losses.append(dist.mean_over_ranks({"loss": out["loss"]})["loss"])  # the Trainer's logged loss
    finally:
        getattr(batches, "close", lambda: None)()
    res = {"losses": losses}
    split = getattr(stage, "split", None)
    if split is not None and split.labelled is not None:
        res["labelled"] = [int(i) for i in split.labelled]
    return res


def _nccl_probe(device) -> dict:
    """A 1-rank NCCL group's all_reduce and barrier: DDP at world size 1 creates no process
    group (engine/runtime/launch.py), so the stage runs alone never reach NCCL."""
    import torch
    import torch.distributed as td

    td.init_process_group("nccl", store=td.HashStore(), rank=0, world_size=1, device_id=device)
    try:
        t = torch.arange(4, dtype=torch.float32, device=device)
        td.all_reduce(t)
        td.barrier(device_ids=[device.index])
        return {"all_reduce": t.tolist(), "pass": t.tolist() == [0.0, 1.0, 2.0, 3.0]}
    finally:
        td.destroy_process_group()


def distributed_rank(smoke: bool, group: str, probe_nccl: bool, progress: str | None = None) -> dict:
    """One rank (started by harness.run_child): every stage for a few steps on in-memory data."""
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown

    s = SIZES[_mode(smoke)]["distributed"]
    dev = _device(smoke)
    # fp32 without TF32 and without cuDNN's autotuning: the comparison is of arithmetic,
    # not of which algorithm cuDNN picked for which batch size.
    over = [f"device={dev.type}", f"distributed.process_group={group}", "distributed.tf32=false",
            "distributed.cudnn_benchmark=false", "distributed.timeout_s=120", "logging.progress=false",
            "attack.name=none", f"model.width={s['width']}", f"pretrain.batch_size={s['batch']}",
            f"supervised.batch_size={s['batch']}", f"linear.batch_size={s['batch']}",
            f"finetune.batch_size={s['finetune_batch']}", f"finetune_labelled.batch_size={s['finetune_batch']}",
            "finetune.iterations_per_epoch=8"]
    dist = init_distributed(dev.type, load_config(None, over).distributed)
    work = Path(tempfile.mkdtemp(prefix=f"dbd-gpu-dist-r{dist.rank}-"))  # per rank: no shared files
    cfg = load_config(None, over + [f"run_dir={work}"])
    data = _memory_data(cfg, dist, s["n_train"], cfg.data.image_size)
    devices = [str(dist.device)]
    if dist.world_size > 1:  # every rank's device, to show where the ranks ran
        import torch.distributed as td

        devices = [None] * dist.world_size
        td.all_gather_object(devices, str(dist.device))
    out = {"world_size": dist.world_size, "backend": dist.backend, "process_group_option": group,
           "device": str(dist.device), "devices": devices, "launcher": dist.launcher, "runs": {}}
    p = _Progress(progress if dist.is_main else None, float("inf"))
    p.data = out
    try:
        for name in dist_stages():
            try:
                out["runs"][name] = _dist_stage(cfg, name, work, dist, data, s["steps"])
            except Exception as e:  # recorded; the ranks fail alike, so the next stage still lines up
                out["runs"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            p.save()
    finally:
        shutdown()
    if probe_nccl:
        try:
            out["nccl_probe"] = _nccl_probe(dist.device)
        except Exception as e:
            out["nccl_probe"] = {"error": f"{type(e).__name__}: {e}", "pass": False}
    out["ffcv_loaded"] = _ffcv_loaded()
    return out


def _compare(one: dict, two: dict) -> dict:
    out = {}
    for name in dist_stages():
        a, b = one.get("runs", {}).get(name, {}), two.get("runs", {}).get(name, {})
        if "losses" not in a or "losses" not in b:
            out[name] = {"compared": False, "reason": a.get("error") or b.get("error") or "no run"}
            continue
        diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
        c = {"losses_1": a["losses"], "losses_2": b["losses"], "abs_diff": diffs, "max_abs_diff": max(diffs)}
        if name in RANK_INVARIANT:
            bounds = [CROSS_TOL if k < CROSS_FIRST else CROSS_LATER_TOL for k in range(len(diffs))]
            c.update(compared=True, tolerance=CROSS_TOL, tolerance_later=CROSS_LATER_TOL, tight_steps=CROSS_FIRST,
                     max_abs_diff_tight=max(diffs[:CROSS_FIRST]), within=all(d <= b for d, b in zip(diffs, bounds)))
        else:
            c.update(compared=False, reason="views drawn per rank: 1 and 2 processes differ by design")
        if "labelled" in a and "labelled" in b:
            c["split_identical"] = a["labelled"] == b["labelled"]
            c["split_labelled"] = len(a["labelled"])
        out[name] = c
    return out


def phase_distributed(smoke: bool, deadline: float, progress: str | None = None, hard: float = 0.0) -> dict:
    """The stages through NCCL at world size 1 and gloo with 2 processes on the one device.

    Runs in the parent: its ranks are child processes already (harness.run_child), and a
    child of a phase child would outlive that child's kill. The two runs go side by side."""
    import torch

    p = _Progress(progress, deadline)
    cuda = not smoke
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: the gpu check needs one (--smoke runs its CPU path)")
    group1 = "nccl" if cuda else "auto"
    if not cuda:
        p.cuda_only("nccl", "needs CUDA: the 1-process run here is on the CPU (process_group auto = gloo; DDP at "
                            "world size 1 opens no group)")
        p.cuda_only("gloo_on_one_gpu", "needs CUDA: the 2 gloo processes share the CPU here, not one GPU")
    hard = hard or deadline + GRACE_S
    work = Path(tempfile.mkdtemp(prefix="dbd-gpu-dist-"))
    # Both runs on one GPU, the first visible one, also where the machine has several
    # (each rank then sees one GPU, and engine.runtime.device puts every rank on it).
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    one_gpu = {"CUDA_VISIBLE_DEVICES": visible.split(",")[0] if visible else "0"} if cuda else {}

    def launch(world: int, group: str) -> dict:
        prog = work / f"ws{world}.json"
        try:
            return run_child("benchmarks.gpu:distributed_rank",
                             dict(smoke=smoke, group=group, probe_nccl=world == 1 and cuda, progress=str(prog)),
                             world=world if world > 1 else 0, timeout=max(10.0, hard - time.time()),
                             threads=1 if smoke else 0, env=one_gpu)  # smoke: 3 processes share the CPU
        except Exception as e:
            partial = json.loads(prog.read_text()) if prog.is_file() else {}
            return {**partial, "error": f"{type(e).__name__}: {e}"}

    t0 = time.time()
    with ThreadPoolExecutor(2) as pool:
        one, two = pool.submit(launch, 1, group1), pool.submit(launch, 2, "gloo")
        one, two = one.result(), two.result()
    p.data["results"] = {"ws1": one, "ws2_gloo": two}
    # A stage that raised inside a run (the run itself completed) counts as the phase's error.
    p.data["failed_runs"] = [f"{ws}/{stage}" for ws, r in p.data["results"].items()
                             for stage, got in (r.get("runs") or {}).items() if "error" in got]
    p.data["comparison"] = _compare(one, two)
    p.data["settings"] = {**SIZES[_mode(smoke)]["distributed"], "stages": dist_stages(),
                          "ws1_process_group": group1, "ws2_process_group": "gloo", "cross_tolerance": CROSS_TOL,
                          "cross_tight_steps": CROSS_FIRST, "cross_later_tolerance": CROSS_LATER_TOL,
                          "numerics": "fp32, TF32 and cuDNN autotuning off"}
    p.data["seconds"] = time.time() - t0
    return p.finish()


# =========================================================================== the run


def _phase_status(value: dict) -> str:
    res = value.get("results") or {}
    if value.get("failed_runs") or any(isinstance(r, dict) and "error" in r for r in res.values()):
        return "errors"
    return "partial" if value.get("skipped") else "ok"


def _measurements(phases: dict) -> dict:
    """The figures the suite's table and chart show (``python -m benchmarks --report``)."""
    out = {}
    views = (phases.get("views") or {}).get("results") or {}
    for key, r in views.items():
        if isinstance(r, dict) and r.get("reps"):
            out[f"views/{key}"] = measurement(r.get("unit", "views/s"), r["reps"])
    steps = (phases.get("steps") or {}).get("results") or {}
    for key, r in steps.items():
        if isinstance(r, dict) and r.get("images_per_s_by_step"):
            out[f"steps/{key}"] = measurement("images/s", r["images_per_s_by_step"],
                                              bf16_peak_share=r.get("bf16_peak_share"))
    return out


def run(quick: bool = False, device: str | None = None, out: str | None = None) -> dict:
    """Every phase in turn, DIR/gpu.json and DIR/gpu.md rewritten after each. ``quick``
    is the smoke run (CPU, whatever ``device``)."""
    from engine.fsutil import write_json

    smoke = bool(quick)
    mode = _mode(smoke)
    out_dir = Path(out or "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    caps = CAPS[mode]
    record = {"benchmark": "gpu", "mode": mode, "quick": smoke, "environment": environment(),
              "ffcv_importable": _ffcv_importable(),
              "budget": {"caps_s": caps, "grace_s": GRACE_S, "planned_limit_s": sum(caps.values()) + GRACE_S},
              "settings": {"mode": mode, "device_requested": device, "sizes": SIZES[mode]},
              "phases": {name: {"status": "pending"} for name in PHASES}}
    if not smoke:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: `python -m benchmarks gpu` needs one; `--smoke` runs its CPU path")
    # Triton reads TRITON_INTERPRET once, at import: the variable goes to the children.
    triton_env = {"TRITON_INTERPRET": "1" if smoke else "0"}

    def write() -> None:
        record["wall_seconds"] = time.time() - start
        record["measurements"] = _measurements(record["phases"])
        write_json(out_dir / "gpu.json", jsonable(record))
        from engine.fsutil import atomic_path

        with atomic_path(out_dir / "gpu.md") as tmp:
            tmp.write_text(markdown(record))

    write()
    with tempfile.TemporaryDirectory(prefix="dbd-gpu-") as tmp:
        cumulative = 0
        for name in PHASES:
            cumulative += caps[name]
            deadline, hard = start + cumulative, start + cumulative + GRACE_S
            progress = Path(tmp) / f"{name}.json"
            t0 = time.time()
            print(f"[gpu] {name}: deadline in {deadline - t0:.0f} s", flush=True)
            try:
                if name == "distributed":
                    value = phase_distributed(smoke, deadline, str(progress), hard=hard)
                else:
                    value = run_child(f"benchmarks.gpu:phase_{name}",
                                      dict(smoke=smoke, deadline=deadline, progress=str(progress)),
                                      timeout=max(5.0, hard - time.time()), env=triton_env)
                status = _phase_status(value)
            except Exception as e:
                value = json.loads(progress.read_text()) if progress.is_file() else {}
                value["error"] = f"{type(e).__name__}: {e}"
                status = "timed_out" if "did not finish" in str(e) else "failed"
            value.update(status=status, seconds=round(time.time() - t0, 1), deadline_s=round(deadline - start, 1))
            record["phases"][name] = value
            write()
            print(f"[gpu] {name}: {status} in {value['seconds']} s", flush=True)
    write()
    return record


# =========================================================================== the summary


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        if v == 0:
            return "0"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}g}"
    return str(v)


def markdown(record: dict) -> str:
    """DIR/gpu.md: what ran, what passed, the figures."""
    env = record.get("environment", {})
    lines = [f"# GPU check ({record['mode']})", "",
             f"Device: **{env.get('device')}** ({env.get('gpu_count', 0)} visible), torch {env.get('torch')}, "
             f"Python {env.get('python')}, commit `{str(env.get('commit'))[:12]}`, {env.get('date')}. "
             f"FFCV importable: {_f(record.get('ffcv_importable'))}. Wall: {_f(record.get('wall_seconds'))} s "
             f"(planned limit {record['budget']['planned_limit_s']} s).", ""]
    if record["mode"] == "smoke":
        lines += ["Smoke run: CPU, tiny sizes, Triton interpreted. Its figures check that the code runs; "
                  "they are not measurements.", ""]
    lines += ["| phase | status | seconds | deadline (s from start) | cases run | skipped |", "|" + " --- |" * 6]
    for name in PHASES:
        ph = record["phases"].get(name, {})
        lines.append(f"| {name} | {ph.get('status')} | {_f(ph.get('seconds'))} | {_f(ph.get('deadline_s'))} | "
                     f"{len(ph.get('results') or {})} | {len(ph.get('skipped') or {})} |")
    for name in PHASES:
        ph = record["phases"].get(name, {})
        lines += ["", f"## {name}", ""]
        if ph.get("error"):
            lines += [f"**Error:** `{ph['error']}`", ""]
        lines += _MD[name](ph)
        for key, why in (ph.get("skipped") or {}).items():
            lines.append(f"- skipped {key}: {why}")
        for key, why in (ph.get("cuda_only") or {}).items():
            lines.append(f"- not shown here ({key}): {why}")
        for note in ph.get("notes") or []:
            lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _errors(results: dict) -> list[str]:
    return [f"- {k}: `{r['error']}`" for k, r in results.items() if isinstance(r, dict) and "error" in r]


def _md_kernels(ph: dict) -> list[str]:
    res = ph.get("results") or {}
    if not res:
        return []
    lines = [f"Passed: **{_f(ph.get('passed'))}** (interpreted: {_f(ph.get('interpreted'))})", "",
             "| case | max abs diff | tolerance | result |", "|" + " --- |" * 4]
    for k, r in res.items():
        if "error" in r:
            continue
        diff = r.get("max_abs_diff")
        if "max_abs_diff_last_rows" in r:
            diff = f"{_f(diff)} (last rows {_f(r['max_abs_diff_last_rows'])})"
        elif "identical" in r:
            diff = "identical" if r["identical"] else "DIFFERENT"
        lines.append(f"| {k} | {_f(diff) if not isinstance(diff, str) else diff} | {_f(r.get('tolerance'))} | "
                     f"{'pass' if r.get('pass') else 'FAIL'} |")
    return lines + _errors(res)


def _md_views(ph: dict) -> list[str]:
    res = ph.get("results") or {}
    if not res:
        return []
    lines = ["| size / method / mode | views/s (median) | min–max |", "|" + " --- |" * 3]
    for k, r in res.items():
        if "error" not in r:
            lines.append(f"| {k} | {_f(r.get('median'))} | {_f(r.get('min'))}–{_f(r.get('max'))} |")
    lines += ["", "| ratio | value |", "| --- | --- |"]
    lines += [f"| {k} | {_f(v)}x |" for k, v in {**(ph.get("ratios") or {}), **(ph.get("decode_ratios") or {})}.items()]
    for t in ph.get("targets") or []:
        lines.append(f"- target {t['name']}: {_f(t['value'])} ({t['target']}): {'met' if t['met'] else 'NOT met'}")
    return lines + _errors(res)


def _md_steps(ph: dict) -> list[str]:
    res = ph.get("results") or {}
    lines = [f"bf16 matmul peak measured: {_f((ph.get('bf16_matmul_peak_flops') or 0) / 1e12)} TFLOP/s.", ""]
    if not res:
        return lines
    lines += ["| case | images/s | share of bf16 peak | host syncs/step | peak GiB | copy / views / model ms |",
              "|" + " --- |" * 6]
    for k, r in res.items():
        if "error" in r:
            continue
        sp = r.get("split_ms") or {}
        lines.append(f"| {k} | {_f(r.get('images_per_s'))} | {_f(100 * r.get('bf16_peak_share', 0))} % | "
                     f"{r.get('host_syncs_per_step')} | {_f(r.get('peak_memory_gib'))} | "
                     f"{_f(sp.get('copy'))} / {_f(sp.get('views'))} / {_f(sp.get('model'))} |")
    syncs = {k: r.get("host_syncs") for k, r in res.items() if isinstance(r, dict) and r.get("host_syncs")}
    for k, v in syncs.items():
        lines.append(f"- host syncs in {k}: {', '.join(f'{n} x {w}' for w, n in v.items())}")
    return lines + _errors(res)


def _md_distributed(ph: dict) -> list[str]:
    res = ph.get("results") or {}
    lines = []
    for key, r in res.items():
        lines.append(f"- {key}: world size {r.get('world_size')}, process group "
                     f"{r.get('backend') or 'none (DDP at world size 1 opens none)'} "
                     f"(option {r.get('process_group_option')}), devices {', '.join(r.get('devices') or [])}"
                     + (f", NCCL probe {'pass' if r['nccl_probe'].get('pass') else 'FAIL'}" if "nccl_probe" in r
                        else "") + (f"; error `{r['error']}`" if "error" in r else ""))
        for stage, run in (r.get("runs") or {}).items():
            if "error" in run:
                lines.append(f"  - {stage}: `{run['error']}`")
    lines += ["", "| stage | 1 process | 2 processes (gloo) | abs diff by step | compared | split identical |",
              "|" + " --- |" * 6]
    for stage, c in (ph.get("comparison") or {}).items():
        if "losses_1" not in c:
            lines.append(f"| {stage} | - | - | - | no: {c.get('reason')} | - |")
            continue
        verdict = (("within" if c["within"] else "OUTSIDE") + f" {_f(c['tolerance'])} (first {c['tight_steps']} "
                   f"steps; later {_f(c['tolerance_later'])})") if c["compared"] else f"no ({c['reason']})"
        lines.append(f"| {stage} | {', '.join(_f(v, 6) for v in c['losses_1'])} | "
                     f"{', '.join(_f(v, 6) for v in c['losses_2'])} | {', '.join(_f(d) for d in c['abs_diff'])} | "
                     f"{verdict} | {_f(c.get('split_identical'))} |")
    return lines


_MD = {"kernels": _md_kernels, "views": _md_views, "steps": _md_steps, "distributed": _md_distributed}

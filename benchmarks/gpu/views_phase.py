"""Phase 2, ``views``: images/s of ``data.decode_device`` (nvJPEG, framing and BadNets on
the device) against the CPU path, and of each attack's device twin; then views/s of the
fused kernels, the PyTorch twin and torchvision v2 by ``timing.measure_views``."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.gpu import timing
from benchmarks.gpu.data import images
from benchmarks.gpu.plan import SIZES, cuda_only, device, mode
from benchmarks.gpu.progress import Progress, free_memory
from benchmarks.harness import measurement, target
from engine.attacks.device import device_twin
from engine.attacks.triggers.badnets import BadNets, BadNetsConfig


def rate(fn, reps: int, dev, count: int, **extra) -> dict:
    """images/s of ``fn`` (``count`` images a call) over ``reps`` calls after one warm-up call."""
    return measurement("images/s", [count / t for t in timing.time_calls(fn, fn, reps, dev)], **extra)


def photo_like_jpegs(batch: int, h: int, w: int) -> list:
    """Coarse noise upsampled, plus a little fine noise: compresses as photos do."""
    from torchvision.io import encode_jpeg
    g = torch.Generator().manual_seed(h)
    coarse = torch.rand(batch, 3, max(2, h // 16), max(2, w // 16), generator=g)
    x = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    x += torch.rand(batch, 3, h, w, generator=g) / 10
    return [encode_jpeg(im, quality=90) for im in (x.clamp(0, 1) * 255).to(torch.uint8)]


def decode_cases(p: Progress, dev, s: dict) -> None:
    """Decode, framing and BadNets on ``dev`` against decode_jpeg on host threads, which
    takes one image after another: a thread per share of the batch."""
    from engine.data.gpu_decode import decode_batch
    size, batch, threads = s["decode_size"], s["batch"], max(1, min(16, os.cpu_count() or 1))
    twin = device_twin(BadNets.from_config(BadNetsConfig()))
    selected = torch.from_numpy(np.random.default_rng(0).random(batch) < s["poisoned"])
    p.data["decode_settings"] = {**s, "cpu_threads": threads, "trigger": "badnets white3x3"}

    def decode(jpegs, d, pool):
        k = len(jpegs) if d.type == "cuda" else -(-len(jpegs) // threads)
        parts = pool.map(lambda i: decode_batch(jpegs[i:i + k], size=size, ratio=1.0, device=d), range(0, batch, k))
        return twin.apply_selected(torch.cat(list(parts)), torch.arange(len(jpegs), device=d), selected.to(d))
    with ThreadPoolExecutor(threads) as pool:
        for h, w in (s["source"], (size, size)):
            label = f"{h}x{w}_to_{size}" if (h, w) != (size, size) else f"{size}_stored"
            jpegs = photo_like_jpegs(batch, h, w)
            for where, d in (("device", dev), ("cpu", torch.device("cpu"))):
                p.case(f"decode/{label}/{where}", lambda d=d, jpegs=jpegs: rate(
                    lambda: decode(jpegs, d, pool), s["reps"], d, batch, device=str(d)), kind="decode")


def trigger_twin_cases(p: Progress, dev, size: int, batch: int, reps: int) -> None:
    """Each attack's device twin on ``size`` px frames, every one triggered (WaNet: half in
    noise mode), in place: each call triggers the frames again, the same work."""
    from engine.attacks.triggers.blended import Blended, BlendedConfig, make_pattern
    from engine.attacks.triggers.sig import SIG, SIGConfig
    from engine.attacks.triggers.wanet import WaNet, WaNetConfig
    b, sig = BlendedConfig(), SIGConfig()
    attacks = {"badnets": BadNets.from_config(BadNetsConfig()),
               "blended": Blended(make_pattern(b.pattern, (size, size), b.pattern_seed, b.resample), b.alpha),
               "sig": SIG(size, sig.delta, sig.f),
               "wanet": WaNet.build(WaNetConfig(), (size, size), noise=np.arange(batch) % 2 == 0)}
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    frames, positions = frames.to(dev), torch.arange(batch, device=dev)
    for name, attack in attacks.items():
        twin, x = device_twin(attack), frames.clone()
        p.case(f"trigger_twin/{name}/{size}px", lambda twin=twin, x=x: rate(
            lambda: twin(x, positions), max(reps, 3), dev, batch, frame=size, device=str(dev)), kind="decode")


def view_cases(p: Progress, dev, s: dict, label: str, source: int, size: int) -> None:
    """The fused kernels and the twin a call per batch, torchvision v2 a call per sample
    (the reference's way)."""
    from kernels import SimCLRSpec
    spec, imgs = SimCLRSpec(size=size), images(s["batch"], source, source, dev, seed=len(label))
    methods = dict(fused=(timing.fused_views, imgs), torch_path=(timing.torch_path_views, imgs),
                   torchvision_v2=(timing.torchvision_v2_views, imgs[:s["per_sample"]]))
    for name, (make, x) in methods.items():
        p.case(f"{label}/{name}", lambda name=name, make=make, x=x: measurement("views/s", timing.measure_views(
            x, spec, {name: make}, s["reps"], dev, until=p.deadline)[name]["reps"], images=len(x)))
    del imgs, methods
    free_memory()


def ratios(results: dict) -> dict:
    """Fused against the other view methods, the device decode against the CPU's."""
    median = {k: r.get("median") for k, r in results.items() if isinstance(r, dict)}
    pairs = [(k, k.replace("/fused", f"/{other}")) for k in median if k.endswith("/fused")
             for other in ("torchvision_v2", "torch_path")]
    pairs += [(k, k.replace("/device", "/cpu")) for k in median if k.startswith("decode/") and k.endswith("/device")]
    return {f"{a}_vs_{b.split('/')[-1]}": median[a] / median[b] for a, b in pairs if median[a] and median.get(b)}


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    p, dev = Progress(progress, deadline, cuda_only("views", smoke)), device(smoke)
    s, decode = SIZES[mode(smoke)]["views"], SIZES[mode(smoke)]["decode"]
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1", settings=s)
    decode_cases(p, dev, decode)  # first: a few seconds, and figures nothing else gives
    trigger_twin_cases(p, dev, decode["decode_size"], decode["batch"], decode["reps"])
    for label, (source, size) in s["sizes"].items():
        view_cases(p, dev, s, label, source, size)
    p.data["ratios"] = ratios(p.data["results"])
    p.data["targets"] = [] if smoke else [target(f"fused SimCLR views vs torchvision v2 per sample at {key}", r, ">=",
                                                 10.0) for key, r in p.data["ratios"].items() if key.endswith("_v2")]
    return p.finish()

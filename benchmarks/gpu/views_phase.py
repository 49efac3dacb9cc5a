"""Phase 2, ``views``: views/s of the fused kernels and the PyTorch twin (a call per batch)
and torchvision v2 (per sample), by ``benchmarks.augment.measure_views``; first, images/s
of ``data.decode_device`` (nvJPEG, framing, BadNets on the device) against the CPU path,
and each attack's device twin (``data.trigger_device``). See docs/benchmarks.md."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from benchmarks import augment
from benchmarks.gpu.common import SIZES, Progress, device, free_memory, images, mode
from benchmarks.harness import measurement, target


def _rate(fn, reps: int, dev, count: int, **extra) -> dict:
    """images/s of ``fn`` (``count`` images a call) over ``reps`` calls after one warm-up."""
    return {"unit": "images/s", **extra, **measurement("images/s", [count / t for t in augment.time_calls(
        fn, fn, reps, dev)])}


def _decode_cases(p: Progress, dev, smoke: bool) -> None:
    """decode + framing + BadNets on ``dev`` (nvJPEG on CUDA) against decode_jpeg on host
    threads with the same framing and trigger, from 400x350 JPEGs and from 256 px ones."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg
    from engine.attacks.device import device_twin
    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig
    from engine.data.gpu_decode import decode_batch
    s = SIZES[mode(smoke)]["decode"]
    size, batch, cpu = s["decode_size"], s["batch"], torch.device("cpu")
    twin = device_twin(BadNets.from_config(BadNetsConfig()))
    selected = torch.from_numpy(np.random.default_rng(0).random(batch) < s["poisoned"])
    threads = max(1, min(16, os.cpu_count() or 1))
    p.data["decode_settings"] = {**s, "cpu_threads": threads, "trigger": "badnets white3x3"}

    def path(jpegs, d, pool):
        # decode_jpeg on the CPU takes one image after another: a thread per share of the batch.
        k = len(jpegs) if d.type == "cuda" else -(-len(jpegs) // threads)
        parts = [jpegs[i:i + k] for i in range(0, len(jpegs), k)]
        out = torch.cat(list(pool.map(lambda c: decode_batch(c, size=size, ratio=1.0, device=d), parts)))
        return twin.apply_selected(out, torch.arange(len(jpegs), device=d), selected.to(d))
    with ThreadPoolExecutor(threads) as pool:
        for h, w in (s["source"], (size, size)):
            # Smooth random images (coarse noise upsampled), which compress as photos do.
            g = torch.Generator().manual_seed(h)
            smooth = F.interpolate(torch.rand(batch, 3, max(2, h // 16), max(2, w // 16), generator=g), size=(h, w),
                                   mode="bicubic", align_corners=False) + torch.rand(batch, 3, h, w, generator=g) * 0.1
            jpegs = [encode_jpeg(x, quality=90) for x in (smooth.clamp(0, 1) * 255).to(torch.uint8)]
            label = f"{h}x{w}_to_{size}" if (h, w) != (size, size) else f"{size}_stored"
            for name, d in (("device", dev), ("cpu", cpu)):
                p.case(f"decode/{label}/{name}", lambda d=d: _rate(lambda: path(jpegs, d, pool), s["reps"], d, batch,
                                                                   device=str(d)), kind="decode")
            dv, cp = (p.data["results"].get(f"decode/{label}/{k}", {}).get("median") for k in ("device", "cpu"))
            if dv and cp:
                p.data.setdefault("decode_ratios", {})[f"decode/{label}/device_vs_cpu"] = dv / cp
    _trigger_twins(p, dev, size, batch, s["reps"])


def _trigger_twins(p: Progress, dev, size: int, batch: int, reps: int) -> None:
    """Each attack's device twin on ``size`` px frames, every image triggered (WaNet: half
    of them noise-mode), in place (each call triggers the frames again, the same work)."""
    import numpy as np
    import torch
    from engine.attacks.device import device_twin
    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig
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
        p.case(f"trigger_twin/{name}/{size}px", lambda twin=twin, x=x: _rate(
            lambda: twin(x, positions), max(reps, 3), dev, batch, frame=size, device=str(dev)), kind="decode")


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """Decode and trigger twins, then views/s: fused Triton and the PyTorch twin batched,
    torchvision v2 per sample (augment's convention: the reference's way)."""
    from kernels import SimCLRSpec, triton_available
    p = Progress(progress, deadline)
    dev = device(smoke)
    s = SIZES[mode(smoke)]["views"]
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1", settings=s)
    if smoke:
        p.cuda_only("fused_speed", "needs CUDA: the fused kernels run interpreted here (TRITON_INTERPRET=1), "
                                   "so their figures time the interpreter, not the kernels")
        p.cuda_only("target", "needs CUDA: fused >= 10x torchvision v2 is a GPU target")
        p.cuda_only("decode_speed", "needs CUDA: nvJPEG; here both decode paths run on the CPU, tiny")
    batched = {"fused": augment.fused_views} if triton_available() else {}
    if not batched:
        p.data["notes"].append("triton is not importable: no fused figures")
    _decode_cases(p, dev, smoke)  # first: a few seconds, and figures nothing else gives
    ratios, targets = {}, []
    for label, (source, size) in s["sizes"].items():
        spec, imgs = SimCLRSpec(size=size), images(s["batch"], source, source, dev, seed=len(label))
        for methods, x in (({**batched, "torch_path": augment.torch_path_views}, imgs),
                           ({"torchvision_v2": augment.torchvision_v2_views}, imgs[:s["per_sample"]])):
            for name, make in methods.items():
                p.case(f"{label}/{name}", lambda name=name, make=make, x=x: {
                    "unit": "views/s", **measurement("views/s", augment.measure_views(
                        x, spec, {name: make}, s["reps"], dev, until=p.deadline)[name]["reps"]), "images": len(x)})
        del imgs
        free_memory()
        f, o = (p.data["results"].get(f"{label}/{k}", {}).get("median") for k in ("fused", "torchvision_v2"))
        if f and o:
            ratios[f"{label}/fused_vs_torchvision_v2"] = f / o
            if not smoke:
                targets.append(target(f"fused SimCLR views vs torchvision v2 per sample at {label}", f / o, ">=", 10.0))
        t = p.data["results"].get(f"{label}/torch_path", {}).get("median")
        if f and t:
            ratios[f"{label}/fused_vs_torch_path"] = f / t
    p.data.update(ratios=ratios, targets=targets)
    return p.finish()

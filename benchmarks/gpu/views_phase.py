"""Phase 2, ``views``: views/s of the fused kernels, the twin and torchvision v2, each per
sample (one call per image) and batched (one call per batch), at 32 and 224 px, by
``benchmarks.augment``'s own view makers and timer. First, images/s of
``data.decode_device: cuda`` (batched nvJPEG, centre crop and resize to 256, BadNets on
10% on the device) against the CPU path (``decode_jpeg`` on host threads, same framing
and trigger), on 400x350 JPEGs and on 256 px ones (decode geometry), and each attack's
device twin (``data.trigger_device``)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from benchmarks import augment
from benchmarks.gpu.common import SIZES, Progress, device, free_memory, images, mode
from benchmarks.harness import measurement, target


def _timed(fn, warm, reps: int, dev, count: int, unit: str, until: float | None = None, **extra) -> dict:
    """``count`` items per call of ``fn``, in ``unit`` (after one call of ``warm``)."""
    rates = [count / t for t in augment.time_calls(fn, warm, reps, dev, until)]
    return {"unit": unit, **extra, **measurement(unit, rates)}


def _jpeg_batch(n: int, height: int, width: int, seed: int) -> list:
    """JPEG bytes of smooth random images (photo-like, so they compress as photos do)."""
    import torch
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, height // 16), max(2, width // 16), generator=g)
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    noise = torch.rand(n, 3, height, width, generator=g) * 0.1
    return [encode_jpeg(img, quality=90) for img in ((smooth + noise).clamp(0, 1) * 255).to(torch.uint8)]


def _decode_cases(p: Progress, dev, smoke: bool) -> None:
    """data.decode_device: images/s of decode + framing + trigger on ``dev`` (nvJPEG on
    CUDA) against the CPU path (decode_jpeg on host threads, the same framing and
    trigger on the host), at source resolution and at decode geometry."""
    import numpy as np
    import torch

    from engine.attacks.device import device_twin
    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig
    from engine.data.gpu_decode import decode_batch

    s = SIZES[mode(smoke)]["decode"]
    (h, w), size, batch = s["source"], s["decode_size"], s["batch"]
    twin = device_twin(BadNets.from_config(BadNetsConfig()))
    selected = torch.from_numpy(np.random.default_rng(0).random(batch) < s["poisoned"])
    threads = max(1, min(16, os.cpu_count() or 1))
    cpu = torch.device("cpu")

    def cpu_path(jpegs, pool):
        # decode_jpeg on the CPU is one image after another: a thread per share of the batch.
        chunks = [c for c in (list(range(k, len(jpegs), threads)) for k in range(threads)) if c]
        parts = pool.map(lambda c: decode_batch([jpegs[i] for i in c], size=size, ratio=1.0, device=cpu), chunks)
        out = torch.empty(len(jpegs), size, size, 3, dtype=torch.uint8)
        for c, part in zip(chunks, parts):
            out[c] = part
        return twin.apply_selected(out, torch.arange(len(jpegs)), selected)

    def device_path(jpegs, _):
        out = decode_batch(jpegs, size=size, ratio=1.0, device=dev)
        return twin.apply_selected(out, torch.arange(len(jpegs), device=dev), selected.to(dev))

    p.data["decode_settings"] = {**s, "cpu_threads": threads, "trigger": "badnets white3x3"}
    with ThreadPoolExecutor(threads) as pool:
        for label, (sh, sw) in ((f"{h}x{w}_to_{size}", (h, w)), (f"{size}_stored", (size, size))):
            jpegs, outs = _jpeg_batch(batch, sh, sw, seed=sh), {}
            for name, path, d in (("device", device_path, dev), ("cpu", cpu_path, cpu)):
                def warm(name=name, path=path):  # also what the two paths' pixels are compared on
                    outs[name] = path(jpegs, pool).cpu().int()

                p.case(f"decode/{label}/{name}", lambda path=path, d=d, warm=warm: _timed(
                    lambda: path(jpegs, pool), warm, s["reps"], d, len(jpegs), "images/s", images=len(jpegs),
                    device=str(d)), kind="decode")
            res = p.data["results"]
            if len(outs) == 2 and "median" in res.get(f"decode/{label}/cpu", {}):
                # nvJPEG against libjpeg, the same framing and trigger: pixels may differ by a level or so.
                diff = (outs["device"] - outs["cpu"]).abs()
                res[f"decode/{label}/cpu"].update(max_abs_diff_vs_device=int(diff.max()),
                                                  mean_abs_diff_vs_device=float(diff.float().mean()))
            dv, cp = (res.get(f"decode/{label}/{k}", {}).get("median") for k in ("device", "cpu"))
            if dv and cp:
                p.data.setdefault("decode_ratios", {})[f"decode/{label}/device_vs_cpu"] = dv / cp
            p.save()
    _trigger_twin_cases(p, dev, size, batch, s["reps"])


def _trigger_twin_cases(p: Progress, dev, size: int, batch: int, reps: int) -> None:
    """data.trigger_device=device: each attack's device twin on a batch of ``size`` px
    frames, every image triggered (WaNet: half of them noise-mode), in images/s. On a GPU
    this is what the CPU loader saves per triggered image (benchmarks loader times the
    same twins on the CPU). The twins work in place: each call triggers the frames again
    (the same work as on fresh frames)."""
    import numpy as np
    import torch

    from engine.attacks.device import device_twin
    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig
    from engine.attacks.triggers.blended import Blended, BlendedConfig, make_pattern
    from engine.attacks.triggers.sig import SIG, SIGConfig
    from engine.attacks.triggers.wanet import WaNet, WaNetConfig

    blended = BlendedConfig()
    attacks = {"badnets": BadNets.from_config(BadNetsConfig()),
               "blended": Blended(make_pattern(blended.pattern, (size, size), blended.pattern_seed, blended.resample),
                                  blended.alpha),
               "sig": SIG(size, SIGConfig().delta, SIGConfig().f),
               "wanet": WaNet.build(WaNetConfig(), (size, size), noise=np.arange(batch) % 2 == 0)}
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    frames, positions = frames.to(dev), torch.arange(batch, device=dev)
    for name, attack in attacks.items():
        twin, x = device_twin(attack), frames.clone()

        def call(twin=twin, x=x):
            twin(x, positions)

        p.case(f"trigger_twin/{name}/{size}px", lambda call=call: _timed(
            call, call, max(reps, 3), dev, batch, "images/s", images=batch, frame=size, device=str(dev)),
            kind="decode")
    p.save()


def _methods(imgs, spec, n: int, fused: bool) -> dict:
    """method/mode -> (fn making two views per image, images it handles, warm-up fn)."""
    out = {}
    makers = {"fused": augment.fused_views} if fused else {}
    for name, make in {**makers, "torch_path": augment.torch_path_views}.items():
        out[f"{name}/batched"] = (make(imgs, spec), len(imgs), None)
        out[f"{name}/per_sample"] = (augment.per_sample(make, imgs, spec, n), n, None)
    # torchvision has nothing to compile or specialise: a few images warm it up.
    out["torchvision_v2/per_sample"] = (augment.torchvision_v2_views(imgs[:n], spec), n,
                                        augment.torchvision_v2_views(imgs[:2], spec))
    out["torchvision_v2/batched"] = (augment.torchvision_v2_batched(imgs, spec), len(imgs), None)
    return out


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    """views/s: fused Triton, the PyTorch twin and torchvision v2, per sample and batched."""
    from kernels import SimCLRSpec, triton_available

    p = Progress(progress, deadline)
    dev = device(smoke)
    s = SIZES[mode(smoke)]["views"]
    fused = triton_available()
    p.data.update(device=str(dev), interpreted=os.environ.get("TRITON_INTERPRET") == "1",
                  settings={k: v for k, v in s.items() if k != "sizes"}, sizes=s["sizes"])
    if smoke:
        p.cuda_only("fused_speed", "needs CUDA: the fused kernels run interpreted here (TRITON_INTERPRET=1), "
                                   "so their figures time the interpreter, not the kernels")
        p.cuda_only("target", "needs CUDA: fused >= 10x torchvision v2 is a GPU target")
        p.cuda_only("decode_speed", "needs CUDA: nvJPEG; here both decode paths run on the CPU, tiny")
    if not fused:
        p.data["notes"].append("triton is not importable: no fused figures")
    _decode_cases(p, dev, smoke)  # first: a few seconds, and figures nothing else gives
    for label, (source, size) in s["sizes"].items():
        spec, imgs = SimCLRSpec(size=size), images(s["batch"], source, source, dev, seed=len(label))
        for key, (fn, n, warm) in _methods(imgs, spec, s["per_sample"], fused).items():
            reps = s["per_sample_reps"] if key.endswith("per_sample") else s["reps"]
            # Warm-up at the timed batch: Triton specialises the compiled kernel on it.
            p.case(f"{label}/{key}", lambda fn=fn, n=n, warm=warm, reps=reps: _timed(
                fn, warm or fn, reps, dev, 2 * n, "views/s", until=p.deadline, images=n))
        del imgs
        free_memory()
    res = p.data["results"]
    ratios, targets = {}, []
    for label in s["sizes"]:
        for mode_ in ("batched", "per_sample"):
            f = res.get(f"{label}/fused/{mode_}", {}).get("median")
            for other in ("torch_path", "torchvision_v2"):
                o = res.get(f"{label}/{other}/{mode_}", {}).get("median")
                if f and o:
                    ratios[f"{label}/{mode_}/fused_vs_{other}"] = f / o
        # augment's convention: the fused batch against torchvision per sample (the reference way).
        f, o = (res.get(f"{label}/{k}", {}).get("median") for k in ("fused/batched", "torchvision_v2/per_sample"))
        if f and o:
            ratios[f"{label}/fused_batched_vs_torchvision_v2_per_sample"] = f / o
            if not smoke:
                targets.append(target(f"fused SimCLR views vs torchvision v2 per sample at {label}", f / o, ">=", 10.0))
    p.data.update(ratios=ratios, targets=targets)
    return p.finish()

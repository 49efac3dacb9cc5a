"""FLOPs per image of the engine's backbones, counted on the real models by
``torch.utils.flop_counter`` (matrix products and convolutions; 2 FLOPs per multiply-add;
the convention and how to use it: docs/benchmarks.md)."""
from __future__ import annotations

import torch

from benchmarks.harness import measurement

# (label, arch, image size): the CIFAR ResNet-18 of the reference, and torchvision's
# ResNet-18/50 at ImageNet size.
MODELS = (("cifar_resnet18@32", "cifar_resnet18", 32), ("resnet18@224", "resnet18", 224),
          ("resnet50@224", "resnet50", 224))


def count(arch: str, size: int, batch: int = 2, head: str = "backbone", width: int = 64) -> dict:
    """FLOPs per image for ``arch`` at ``size`` px (counted on ``batch`` images, divided).
    ``head``: ``backbone`` alone, or ``simclr`` (backbone + the SimCLR projection head).
    """
    from torch.utils.flop_counter import FlopCounterMode
    from engine.models import SimCLRModel, build_backbone
    # On the meta device: shapes only, so the count is exact and takes no compute.
    with torch.device("meta"):
        model = SimCLRModel(arch, width) if head == "simclr" else build_backbone(arch, width)
        x = torch.randn(batch, 3, size, size)
    model.train()
    with FlopCounterMode(display=False) as fwd:
        out = model(x)
    with FlopCounterMode(display=False) as bwd:
        out.float().sum().backward()
    f, b = fwd.get_total_flops() / batch, bwd.get_total_flops() / batch
    return {"forward": f, "backward": b, "forward_backward": f + b}


def run(quick: bool = False) -> dict:
    """Counted on the meta device: as cheap in quick mode as in full."""
    per_model = {label: {k: v / 1e9 for k, v in count(arch, size).items()} for label, arch, size in MODELS}
    per_model["cifar_resnet18@32+simclr_head"] = {
        k: v / 1e9 for k, v in count("cifar_resnet18", 32, head="simclr").items()}
    measurements = {f"{label}/{kind}": measurement("GFLOP/image", [c[kind]]) for label, c in per_model.items()
                    for kind in ("forward", "forward_backward") if kind == "forward_backward" or "+" not in label}
    return {
        "unit": "GFLOP/image",
        "settings": {"counter": "torch.utils.flop_counter.FlopCounterMode", "width": 64, "quick": quick,
                     "models": [m[0] for m in MODELS],
                     "convention": "2 FLOPs per multiply-add; convolutions and matrix products only"},
        "gflops_per_image": {k: v for k, v in per_model.items() if "+" not in k},
        "measurements": measurements,
        "notes": ["a SimCLR training step processes 2 views per image: its FLOPs per image are twice the "
                  "forward_backward figure (plus the small projection head)"],
    }

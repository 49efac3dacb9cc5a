"""The backbone registry: ``model.arch`` -> a callable ``(width) -> nn.Module``.

A backbone maps images to a flat feature vector and exposes ``feature_dim``; the heads
(engine/models/compose.py) sit on top. Each backbone module registers itself with
``@BACKBONES.register("name")``, and importing ``engine.models`` imports every module of
the package, so a new backbone is one new file in engine/models/ and nothing else.
What ``width`` means is each backbone's own rule, written in its module docstring; the
config default (64) is always the reference network.
"""
from __future__ import annotations

from torch import nn

from engine.registry import Registry

BACKBONES: Registry = Registry("backbone")


def build_backbone(arch: str, width: int = 64) -> nn.Module:
    """The backbone ``arch`` at ``width``; an unknown arch is a UserError naming model.arch."""
    return BACKBONES.lookup(arch, "model.arch")(width)

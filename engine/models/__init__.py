"""Backbones and heads. A backbone maps images to a flat feature vector.

Importing this package imports every module of it, so each backbone registers in
:data:`BACKBONES` by its ``model.arch`` name (the ResNets first: the order help and
error texts list them in).
"""
import sys

from engine.models import resnet  # noqa: F401  (registers first: cifar_resnet18, resnet18, resnet50)
from engine.models.backbones import BACKBONES, build_backbone
from engine.models.heads import LinearClassifier, ProjectionHead

BACKBONES.load(sys.modules[__name__])

__all__ = ["BACKBONES", "build_backbone", "ProjectionHead", "LinearClassifier", "SimCLRModel", "Classifier"]

from engine.models.compose import Classifier, SimCLRModel  # noqa: E402

"""Backbones and heads. A backbone maps images to a flat feature vector."""
from engine.models.heads import LinearClassifier, ProjectionHead
from engine.models.resnet import build_backbone

__all__ = ["build_backbone", "ProjectionHead", "LinearClassifier", "SimCLRModel", "Classifier"]

from engine.models.compose import Classifier, SimCLRModel  # noqa: E402

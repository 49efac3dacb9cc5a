"""The DBD reference way of feeding training, re-created for side-by-side benchmarks (not
part of the engine)."""
from benchmarks.reference.pipeline import (
    BadNetsTrigger,
    InMemoryPoisonDataset,
    JPEGPoisonDataset,
    reference_loader,
    simclr_transform,
    weak_transform,
)

__all__ = ["BadNetsTrigger", "InMemoryPoisonDataset", "JPEGPoisonDataset", "reference_loader",
           "simclr_transform", "weak_transform"]

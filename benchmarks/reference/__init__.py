"""The DBD reference way of feeding training, re-created for side-by-side benchmarks.

Not part of the engine: it exists so the benchmarks can measure the engine against
the way the reference code (SCLBD/DBD, BackdoorBench) prepares its data.
"""
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

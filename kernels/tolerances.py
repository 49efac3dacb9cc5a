"""How close the fused Triton kernels must come to their PyTorch twin: the one place the
kernels' tests (tests/kernels) and the GPU check (benchmarks/gpu) read it from.

SimCLR views and the evaluation normalisation are compared on [0, 1] pixels after
un-normalising: fp32 is rounding-level; the half types are bounded by one output ulp at
|normalised| < 4 (fp16 2^-9, bf16 2^-6) times std ~ 0.2. The weak view (crop + flip, no
arithmetic on the pixels but the normalisation) is compared normalised.
"""
from __future__ import annotations

SIMCLR = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 5e-3}  # by the output dtype's short name
WEAK = 1e-6
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch.<name> -> SIMCLR's key


def simclr_by_dtype() -> dict:
    """``SIMCLR`` keyed by torch dtype."""
    import torch

    return {getattr(torch, name): SIMCLR[short] for name, short in DTYPE_NAMES.items()}

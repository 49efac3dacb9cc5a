"""The run's numeric precision: one rule for autocast and the gradient scaler.

``precision`` is fp32, bf16 or fp16. Training (the DDP backend), evaluation, the
split's loss pass and the feature dump all autocast through :meth:`Precision.autocast`,
so a model is never scored in another precision than it was trained in. fp16 runs
under autocast to fp16 on every device (CPU autocast has fp16 kernels in the pinned
torch) with a dynamic gradient scaler; bf16 needs none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16

    def __post_init__(self) -> None:
        if self.name not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {self.name!r}")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype autocast runs matmuls and convolutions in; None for fp32 (no autocast)."""
        return None if self.name == "fp32" else DTYPES[self.name]

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        return autocast_context(device, self.autocast_dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        return torch.amp.GradScaler(device.type) if self.name == "fp16" else None


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """The one place autocast is built: ``dtype`` on ``device``, or nothing for None (fp32).
    DeepSpeed's backend calls it with the dtype of its config's ``torch_autocast``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)

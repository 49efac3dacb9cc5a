"""Interpreter set-up for the kernels tests (helpers live in kernels_testutil.py)."""

from __future__ import annotations

import os
import sys

# Without a GPU, Triton kernels can only run interpreted, and triton fixes the mode when
# it is first imported (torchvision imports it too): set the mode before any test module
# here imports either. test_kernels_triton.py runs its interpreted checks in a fresh
# process of their own.
if "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

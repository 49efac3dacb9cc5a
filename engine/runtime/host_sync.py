"""Counting the calls that make the host wait for the device.

On CUDA each of these blocks the CPU until the queued kernels have run, which empties
the launch queue and leaves the GPU idle while Python catches up: reading a value
(``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``), copying to the host
(``.cpu()``, ``.numpy()``), data-dependent shapes (``.nonzero()``, boolean-mask
indexing, ``masked_select``, ``unique``) and a ``.to(device)`` copy without
``non_blocking=True``.

On a CPU the same calls cost nothing, so ``HostSyncCounter`` records them by name
whatever the device: a test on a CPU catches the call that would stall a GPU. Only
calls made from this project's code count (``engine/``, ``kernels/``): PyTorch's own
internals (the optimizers' host-side step counters, say) are its business, and a test
cannot tell their host tensors from device ones on a CPU.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_ROOT = Path(__file__).resolve().parents[2]
_OURS = (str(_ROOT / "engine") + "/", str(_ROOT / "kernels") + "/")
_THIS = str(Path(__file__).resolve())

# Calls that always wait for the device (their result is a host value or a shape).
_ALWAYS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
           "argwhere", "masked_select", "unique", "unique_consecutive"}


@dataclass(frozen=True)
class HostSync:
    what: str  # the call, e.g. "item" or "to (blocking)"
    where: str  # file:line of the project code that made it


def _blocking_copy(args, kwargs) -> bool:
    """``t.to(...)`` / ``t.cuda(...)`` that moves data and does not say non_blocking."""
    if kwargs.get("non_blocking") is True or any(a is True for a in args[1:]):
        return False
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str)) or (torch.is_tensor(a) and a is not args[0]) for a in args[1:])


def _mask_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts)


def _reason(func, args, kwargs) -> str | None:
    name = getattr(func, "__name__", "")
    if name in _ALWAYS:
        return name
    if name in ("to", "cuda") and _blocking_copy(args, kwargs):
        return f"{name} (blocking)"
    if name == "__getitem__" and _mask_index(args):
        return "boolean-mask index"
    return None


def _caller() -> str | None:
    """file:line of the code that made the call when it is the project's; None when
    PyTorch (or any other library, or a test) made it."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == _THIS:
        frame = frame.f_back
    if frame is None:
        return None
    path = frame.f_code.co_filename
    return f"{Path(path).name}:{frame.f_lineno}" if path.startswith(_OURS) else None


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as c: ...`` then ``c.calls``: every host sync the
    project's code made inside the block, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[HostSync] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _reason(func, args, kwargs)
        if why is not None:
            where = _caller()
            if where is not None:
                self.calls.append(HostSync(why, where))
        return func(*args, **kwargs)

    def __len__(self) -> int:
        return len(self.calls)

    def summary(self) -> dict[str, int]:
        """Count per ``what @ where``, for reports and failure messages."""
        out: dict[str, int] = {}
        for c in self.calls:
            key = f"{c.what} @ {c.where}"
            out[key] = out.get(key, 0) + 1
        return out

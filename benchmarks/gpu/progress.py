"""``Progress``: a phase's cases run one by one, each saved atomically as it ends, so that
a phase killed at its time cap still reports the cases it finished."""
from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from pathlib import Path

from benchmarks.harness import jsonable


def free_memory() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def ffcv_importable() -> bool:
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return False
    return True


def saved_on_error(fn, saved: Path) -> dict:
    """``fn()``, or, should it raise (a child failed or was killed), what was saved, with the error."""
    try:
        return fn()
    except Exception as e:
        return {**(json.loads(saved.read_text()) if saved.is_file() else {}), "error": f"{type(e).__name__}: {e}"}


class Progress:
    def __init__(self, path: str | None, deadline: float, cuda_only: dict | None = None):
        self.path, self.deadline = path, deadline
        self.data: dict = {"results": {}, "skipped": {}, "cuda_only": cuda_only or {}, "notes": []}
        self.took: dict = {}  # seconds of the latest case of each kind, and (None) of any kind

    def save(self) -> None:
        if self.path:
            from engine.fsutil import write_json
            write_json(self.path, jsonable(self.data))

    def case(self, key: str, fn, kind: str | None = None) -> None:
        """``fn()`` as case ``key``, unless the deadline is nearer than the latest case of
        ``kind`` took (the first of a kind: the latest case). An error is recorded, not
        raised: one broken case must not hide the others."""
        estimate, left = self.took.get(kind, self.took.get(None, 0.0)), self.deadline - time.time()
        t0 = time.time()
        if estimate > left:
            self.data["skipped"][key] = f"phase time cap: {max(left, 0):.0f} s left, about {estimate:.0f} s needed"
        else:
            try:
                self.data["results"][key] = {**fn(), "seconds": round(time.time() - t0, 2)}
            except Exception as e:
                self.data["results"][key] = {"error": f"{type(e).__name__}: {e}",
                                             "traceback": traceback.format_exc()[-3000:]}
                free_memory()  # out here, where the failed case's frames (and tensors) are gone
            self.took[kind] = self.took[None] = time.time() - t0
        self.save()

    def finish(self) -> dict:
        self.data["ffcv_loaded"] = any(m.split(".")[0] == "ffcv" for m in sys.modules)
        self.data["ffcv_importable"] = ffcv_importable()
        self.save()
        return self.data

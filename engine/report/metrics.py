"""Machine-readable metrics: one JSON object per line, appended by rank 0 only.

Lines are flushed and fsynced as they are written, so a killed run keeps every record
up to the kill; a resumed stage appends to the same file (records carry the stage,
epoch and step, so duplicates after a resume are recognisable).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.fsutil import _json_default


class MetricsWriter:
    """Appends records to ``path`` and, when given, also to ``also`` (a stage-store entry
    keeps its stage's own records: engine.stages.store) and hands each to ``sinks``
    (live TensorBoard and W&B: engine/report/live.py)."""

    def __init__(self, path: str | Path, enabled: bool = True, also: str | Path | None = None,
                 sinks: tuple = (), **context: Any):
        self.path = Path(path)
        self.enabled = enabled
        self.also = Path(also) if also is not None else None
        self.sinks = tuple(sinks)
        self.context = context
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def with_context(self, **context: Any) -> "MetricsWriter":
        return MetricsWriter(self.path, self.enabled, self.also, self.sinks, **{**self.context, **context})

    def teed(self, also: str | Path) -> "MetricsWriter":
        return MetricsWriter(self.path, self.enabled, also, self.sinks, **self.context)

    def log(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "kind": kind, **self.context, **values}
        line = json.dumps(record, default=_json_default)
        for path in (self.path, self.also) if self.also is not None else (self.path,):
            _end_torn_line(path)
            with open(path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        for sink in self.sinks:  # after the file: a failing sink never costs a record
            if id(sink) in _failed_sinks:
                continue
            try:
                sink.write(record)
            except Exception as e:  # W&B offline from the network, a full disk: the run goes on
                _failed_sinks.add(id(sink))
                print(f"warning: {type(sink).__name__} failed ({type(e).__name__}: {e}); metrics.jsonl keeps every "
                      "record, and no more go to it in this process", file=sys.stderr, flush=True)


_checked: set[str] = set()
_failed_sinks: set[int] = set()


def _end_torn_line(path: Path) -> None:
    """Once per file and process: a kill in the middle of an append leaves a last line
    without its newline; end it, so that the next record starts a line of its own
    instead of being glued to the torn one (and lost with it)."""
    key = str(path)
    if key in _checked:
        return
    _checked.add(key)
    try:
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    except FileNotFoundError:
        pass


def read_metrics(path: str | Path) -> list[dict]:
    """All complete records; a torn last line (a kill mid-write) is skipped."""
    out = []
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out

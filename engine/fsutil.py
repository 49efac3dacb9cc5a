"""Atomic writes: a reader never sees a half-written file under its final name.

Every checkpoint, result and dataset goes through here: write to a temporary name in
the same folder (same filesystem, so the rename is atomic), fsync, then rename.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


# For the kill-at-any-moment test (tests/sweep/test_sweep_kill.py): with DBD_WRITE_TRACE
# set to a file, every atomic write appends "begin PATH" before it starts and "end PATH"
# after its rename, and DBD_WRITE_PAUSE seconds pass between the written temporary file
# and the rename, so that a SIGKILL from outside can land inside a write on purpose.
WRITE_TRACE_ENV, WRITE_PAUSE_ENV = "DBD_WRITE_TRACE", "DBD_WRITE_PAUSE"


def _trace(event: str, path: Path) -> None:
    trace = os.environ.get(WRITE_TRACE_ENV)
    if trace:
        with open(trace, "a") as f:
            f.write(f"{event} {path}\n")
            f.flush()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` on success.

    On any exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    _trace("begin", final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would make results unreadable to others
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if os.environ.get(WRITE_PAUSE_ENV):
            import time

            time.sleep(float(os.environ[WRITE_PAUSE_ENV]))
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
        _trace("end", final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text(final: str | os.PathLike, text: str) -> None:
    write_bytes(final, text.encode("utf-8"))


def write_json(final: str | os.PathLike, obj: Any) -> None:
    write_text(final, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def torch_save(final: str | os.PathLike, obj: Any) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(final, buf.getvalue())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (files may be gigabytes)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """``sha256_file`` memoised per (resolved path, size, mtime), so that keying many cells
    on one input file reads it once. Not for integrity checks (a flipped bit keeps the
    mtime): those call ``sha256_file``."""
    p = Path(path).resolve()
    st = p.stat()
    memo = (str(p), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = sha256_file(p)
    return _DIGESTS[memo]

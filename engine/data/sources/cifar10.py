"""CIFAR-10 in its Python-pickle release: the extracted folder or the .tar.gz."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from engine.data.sources.base import ContentHasher, SourceSplits, array_dataset
from engine.errors import UserError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"


def read(source: str | None, **_: object) -> SourceSplits:
    if not source:
        raise UserError("cifar10 needs --source: the cifar-10-batches-py folder or cifar-10-python.tar.gz")
    path = Path(source)
    if not path.exists():
        raise UserError(f"cifar10 source not found: {path}")
    blobs = _read_tar(path) if path.is_file() else _read_folder(path)
    hasher = ContentHasher()
    for name in TRAIN_BATCHES + [TEST_BATCH, META]:
        hasher.update(name.encode())
        hasher.update(blobs[name])
    classes = [c.decode() if isinstance(c, bytes) else c for c in _unpickle(blobs[META], META)[_key("label_names")]]
    train_x, train_y = zip(*(_batch(blobs[b], b) for b in TRAIN_BATCHES))
    test_x, test_y = _batch(blobs[TEST_BATCH], TEST_BATCH)
    return SourceSplits(
        train=array_dataset(np.concatenate(train_x), np.concatenate(train_y)),
        test=array_dataset(test_x, test_y),
        classes=classes,
        content_hash=hasher.hexdigest(),
        fixed_size=True,
    )


def _key(name: str) -> bytes:
    return name.encode()


def _read_folder(path: Path) -> dict[str, bytes]:
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    missing = [n for n in TRAIN_BATCHES + [TEST_BATCH, META] if not (path / n).is_file()]
    if missing:
        raise UserError(f"{path} is not a CIFAR-10 python folder: missing {', '.join(missing)}")
    return {n: (path / n).read_bytes() for n in TRAIN_BATCHES + [TEST_BATCH, META]}


def _read_tar(path: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(path, "r:*") as tar:
            blobs = {}
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in TRAIN_BATCHES + [TEST_BATCH, META]:
                    blobs[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path} is not a readable CIFAR-10 archive: {e}") from None
    missing = [n for n in TRAIN_BATCHES + [TEST_BATCH, META] if n not in blobs]
    if missing:
        raise UserError(f"{path} is not a CIFAR-10 python archive: missing {', '.join(missing)}")
    return blobs


def _unpickle(blob: bytes, name: str) -> dict:
    try:
        return pickle.load(io.BytesIO(blob), encoding="bytes")
    except Exception as e:  # a truncated or foreign file surfaces as many exception types
        raise UserError(f"CIFAR-10 file {name} is unreadable: {e}") from None


def _batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(blob, name)
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except KeyError as e:
        raise UserError(f"CIFAR-10 file {name} lacks key {e}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 file {name} has shape {data.shape}, expected (N, 3072)")
    # Stored channel-planar (N, 3, 32, 32); the engine works in HWC.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels

"""CIFAR-10 in its Python-pickle release: the extracted folder or the .tar.gz."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.sources.pickled import read_release, unpickle
from engine.data.sources.base import SOURCES, ContentHasher, SourceSplits, array_dataset
from engine.errors import UserError

TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"


@SOURCES.register("cifar10")
def read(source: str | None, **_: object) -> SourceSplits:
    if not source:
        raise UserError("cifar10 needs --source: the cifar-10-batches-py folder or cifar-10-python.tar.gz")
    path = Path(source)
    if not path.exists():
        raise UserError(f"cifar10 source not found: {path}")
    blobs = read_release(path, TRAIN_BATCHES + [TEST_BATCH, META], "cifar-10-batches-py", "CIFAR-10")
    hasher = ContentHasher()
    for name in TRAIN_BATCHES + [TEST_BATCH, META]:
        hasher.update(name.encode())
        hasher.update(blobs[name])
    names = unpickle(blobs[META], META, "CIFAR-10")[_key("label_names")]
    classes = [c.decode() if isinstance(c, bytes) else c for c in names]
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


def _batch(blob: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = unpickle(blob, name, "CIFAR-10")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except KeyError as e:
        raise UserError(f"CIFAR-10 file {name} lacks key {e}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise UserError(f"CIFAR-10 file {name} has shape {data.shape}, expected (N, 3072)")
    # Stored channel-planar (N, 3, 32, 32); the engine works in HWC.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels

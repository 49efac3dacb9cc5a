"""CIFAR-100 in its Python-pickle release: the extracted ``cifar-100-python`` folder
(``train``, ``test``, ``meta``) or ``cifar-100-python.tar.gz``.

The 100 fine labels are the labels (as torchvision's ``CIFAR100`` and BackdoorBench use
them); class names come from ``meta``'s ``fine_label_names``. The 20 coarse
("superclass") labels are not trained on but kept: ``meta.json`` ``notes`` gets
``coarse_classes`` (the names, from ``coarse_label_names``) and ``coarse_labels``
(``{"train": [...], "test": [...]}``, one per image, in ``.beton`` index order).
Images are 32x32 and written raw, exactly.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.sources.pickled import read_release, unpickle
from engine.data.sources.base import SOURCES, ContentHasher, SourceSplits, array_dataset
from engine.errors import UserError

FILES = ("train", "test", "meta")
FOLDER = "cifar-100-python"


@SOURCES.register("cifar100")
def read(source: str | None, **_: object) -> SourceSplits:
    if not source:
        raise UserError("cifar100 needs --source: the cifar-100-python folder or cifar-100-python.tar.gz")
    path = Path(source)
    if not path.exists():
        raise UserError(f"cifar100 source not found: {path}")
    blobs = read_release(path, FILES, FOLDER, "CIFAR-100", in_folder_only=True)
    hasher = ContentHasher()
    for name in FILES:
        hasher.update(name.encode())
        hasher.update(blobs[name])
    meta = unpickle(blobs["meta"], "meta", "CIFAR-100")
    fine_names = _names(meta, "fine_label_names")
    coarse_names = _names(meta, "coarse_label_names")
    train_x, train_y, train_c = _split(blobs["train"], "train", len(fine_names), len(coarse_names))
    test_x, test_y, test_c = _split(blobs["test"], "test", len(fine_names), len(coarse_names))
    return SourceSplits(
        train=array_dataset(train_x, train_y),
        test=array_dataset(test_x, test_y),
        classes=fine_names,
        content_hash=hasher.hexdigest(),
        fixed_size=True,
        notes={"labels": "fine (100 classes)", "coarse_classes": coarse_names,
               "coarse_labels": {"train": train_c.tolist(), "test": test_c.tolist()}},
    )


def _names(meta: dict, key: str) -> list[str]:
    if key.encode() not in meta:
        raise UserError(f"CIFAR-100 file meta lacks key {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta[key.encode()]]


def _split(blob: bytes, name: str, n_fine: int, n_coarse: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = unpickle(blob, name, "CIFAR-100")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        fine = np.asarray(d[b"fine_labels"], dtype=np.int64)
        coarse = np.asarray(d[b"coarse_labels"], dtype=np.int64)
    except KeyError as e:
        raise UserError(f"CIFAR-100 file {name} lacks key {e.args[0]!r}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(fine) != len(data) or len(coarse) != len(data):
        raise UserError(f"CIFAR-100 file {name} has data {data.shape}, {len(fine)} fine and {len(coarse)} "
                        f"coarse labels; expected (N, 3072) and N of each")
    for what, y, n in (("fine_labels", fine, n_fine), ("coarse_labels", coarse, n_coarse)):
        if len(y) and (y.min() < 0 or y.max() >= n):
            raise UserError(f"CIFAR-100 file {name}: {what} run outside [0, {n}) (meta names {n} classes)")
    # Stored channel-planar (N, 3, 32, 32); the engine works in HWC.
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), fine, coarse

"""What every reader returns: indexable splits the FFCV writer can consume; and the
registry of readers (each source module registers its ``read`` by dataset name)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engine.registry import Registry

# dataset name -> read(source, **options) -> SourceSplits; filled as each module of
# engine/data/sources is imported (engine/data/sources/__init__.py imports them all).
SOURCES: Registry = Registry("dataset")


class SourceDataset:
    """Indexable ``(image uint8 HWC, label, index)``; images load lazily.

    ``load(i)`` returns the i-th image as a uint8 HWC RGB array. Pickled into the FFCV
    writer's worker processes, so it holds only plain data and a module-level loader.
    """

    def __init__(self, labels: Sequence[int], load: Callable[[int], np.ndarray],
                 sizes: np.ndarray | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self._load = load
        self._sizes = sizes  # (N, 2) heights and widths when known without decoding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self._load(i)
        return img, int(self.labels[i]), int(i)

    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = np.array([self._load(i).shape[:2] for i in range(len(self))], dtype=np.int64)
        return self._sizes


@dataclass
class SourceSplits:
    train: SourceDataset
    test: SourceDataset
    classes: list[str]
    content_hash: str
    fixed_size: bool  # True: every image has the same size (written raw)
    notes: dict = field(default_factory=dict)
    # Variable-size sources stored at the loader's decode geometry (a square of this
    # side, engine/data/decode_geometry.py); 0: stored at source resolution.
    decode_size: int = 0


class ContentHasher:
    """sha256 over labels and source bytes, so a poison plan can be tied to the data."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).tobytes()
        self._h.update(data)

    def update_file(self, path: Path) -> None:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                self._h.update(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


class ArrayLoader:
    """Picklable loader over an in-memory uint8 NHWC array."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __call__(self, i: int) -> np.ndarray:
        return self.images[i]


def array_dataset(images: np.ndarray, labels: np.ndarray) -> SourceDataset:
    n, h, w, _ = images.shape
    return SourceDataset(labels, ArrayLoader(images), np.tile([h, w], (n, 1)))

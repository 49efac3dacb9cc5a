"""Shared pieces for readers of image-file trees (GTSRB, ImageFolder)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.data.sources.base import ContentHasher
from engine.errors import UserError


class FileLoader:
    """Picklable: decode the i-th file to uint8 HWC RGB, optionally resized."""

    def __init__(self, paths: list[str], resize: int = 0, max_resolution: int = 0):
        self.paths = paths
        self.resize = resize
        self.max_resolution = max_resolution

    def __call__(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if self.resize:
                    im = im.resize((self.resize, self.resize), Image.BILINEAR)
                elif self.max_resolution and max(im.size) > self.max_resolution:
                    # Same rule as FFCV's writer: the longer side is capped.
                    s = self.max_resolution / max(im.size)
                    im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
                return np.asarray(im, dtype=np.uint8).copy()
        except Exception as e:  # PIL raises many types for broken files
            raise UserError(f"unreadable image {path}: {e}") from None


def image_sizes(paths: list[str], threads: int = 8) -> np.ndarray:
    """(N, 2) heights and widths from the headers, checking each file opens."""
    from PIL import Image

    def size(p: str) -> tuple[int, int]:
        try:
            with Image.open(p) as im:
                im.verify()
            with Image.open(p) as im:
                return im.height, im.width
        except Exception as e:
            raise UserError(f"unreadable image {p}: {e}") from None

    with ThreadPoolExecutor(threads) as pool:
        return np.array(list(pool.map(size, paths)), dtype=np.int64).reshape(-1, 2)


def hash_files(hasher: ContentHasher, root: Path, paths: list[str], labels: np.ndarray,
               threads: int = 8) -> None:
    """Fold relative paths, labels and file contents into ``hasher`` (order-stable)."""
    import hashlib

    def digest(p: str) -> bytes:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.digest()

    with ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(digest, paths))
    for p, y, d in zip(paths, labels, digests):
        hasher.update(str(Path(p).relative_to(root)).encode())
        hasher.update(int(y).to_bytes(8, "little"))
        hasher.update(d)

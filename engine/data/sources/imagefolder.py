"""ImageFolder trees: ``train/<class>/*`` and ``val/<class>/*`` (ImageNet and subsets).

``classes_file`` (one class folder name per line) selects a subset such as ImageNet-30;
labels follow that file's order, or the sorted folder names without it.

``decode_size`` N > 0 (``dbd prepare imagefolder --decode-size``, default 256 as the
presets): each image is stored as its centre square resized to N x N, the loader's own
training frame (engine/data/decode_geometry.py), so loading costs about one decode.
``decode_size`` 0: images keep their own sizes (capped at ``max_resolution`` on the
longer side) and the loader crops and resizes them every epoch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.decode_geometry import AtDecodeGeometry
from engine.data.sources.base import SOURCES, ContentHasher, SourceDataset, SourceSplits
from engine.data.sources.files import FileLoader, hash_files, image_sizes
from engine.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".JPEG"}


@SOURCES.register("imagefolder")
def read(source: str | None, classes_file: str | None = None, max_resolution: int = 512,
         decode_size: int = 0, **_: object) -> SourceSplits:
    if not source:
        raise UserError("imagefolder needs --source: a folder with train/ and val/ class trees")
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"imagefolder source not found: {root}")
    if decode_size < 0:
        raise UserError(f"--decode-size must be 0 (source resolution) or a side in pixels, got {decode_size}")
    if decode_size and max_resolution and decode_size > max_resolution:
        raise UserError(f"--decode-size {decode_size} exceeds --max-resolution {max_resolution}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root} is not an ImageFolder tree: {split}/ is missing")
    classes = _classes(root / "train", classes_file)
    hasher = ContentHasher()
    splits = {}
    for split in ("train", "val"):
        paths, labels = _scan(root / split, classes)
        hash_files(hasher, root, paths, labels)
        sizes = image_sizes(paths)  # also checks that every file opens
        if decode_size:
            # Full source resolution into the one crop-and-resize: no cap, no second resample.
            load = AtDecodeGeometry(FileLoader(paths), decode_size)
            sizes = np.tile([decode_size, decode_size], (len(paths), 1)).astype(np.int64)
        else:
            load = FileLoader(paths, max_resolution=max_resolution)
            if max_resolution:
                scale = np.minimum(1.0, max_resolution / sizes.max(axis=1))
                sizes = np.maximum(1, np.round(sizes * scale[:, None])).astype(np.int64)
        splits[split] = SourceDataset(labels, load, sizes)
    # The stored pixels depend on the geometry: it is part of the data's identity.
    geometry = f"decode_size={decode_size}" if decode_size else f"max_resolution={max_resolution}"
    hasher.update(f"classes={','.join(classes)};{geometry}".encode())
    return SourceSplits(train=splits["train"], test=splits["val"], classes=classes,
                        content_hash=hasher.hexdigest(), fixed_size=False, decode_size=decode_size)


def _classes(train_dir: Path, classes_file: str | None) -> list[str]:
    present = sorted(d.name for d in train_dir.iterdir() if d.is_dir())
    if not present:
        raise UserError(f"{train_dir} has no class folders")
    if not classes_file:
        return present
    path = Path(classes_file)
    if not path.is_file():
        raise UserError(f"classes file not found: {path}")
    wanted = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not wanted:
        raise UserError(f"classes file {path} lists no class")
    missing = [c for c in wanted if c not in present]
    if missing:
        raise UserError(f"classes file {path} names folders not in {train_dir}: {', '.join(missing[:5])}")
    if len(set(wanted)) != len(wanted):
        raise UserError(f"classes file {path} lists a class twice")
    return wanted


def _scan(split_dir: Path, classes: list[str]) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    for label, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            raise UserError(f"class folder missing: {d}")
        files = sorted(str(p) for p in d.iterdir()
                       if p.is_file() and p.suffix in EXTENSIONS | {e.lower() for e in EXTENSIONS})
        if not files:
            raise UserError(f"class folder {d} is empty")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)

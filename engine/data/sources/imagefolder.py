"""ImageFolder trees: ``train/<class>/*`` and ``val/<class>/*`` (ImageNet and subsets).

``classes_file`` (one class folder name per line) selects a subset such as ImageNet-30;
labels follow that file's order, or the sorted folder names without it. Images keep
their own sizes (capped at ``max_resolution`` on the longer side) and are written as
JPEG, so the loader decodes at source resolution.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.data.sources.base import ContentHasher, SourceDataset, SourceSplits
from engine.data.sources.files import FileLoader, hash_files, image_sizes
from engine.errors import UserError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".JPEG"}


def read(source: str | None, classes_file: str | None = None, max_resolution: int = 512,
         **_: object) -> SourceSplits:
    if not source:
        raise UserError("imagefolder needs --source: a folder with train/ and val/ class trees")
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"imagefolder source not found: {root}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"{root} is not an ImageFolder tree: {split}/ is missing")
    classes = _classes(root / "train", classes_file)
    hasher = ContentHasher()
    splits = {}
    for split in ("train", "val"):
        paths, labels = _scan(root / split, classes)
        hash_files(hasher, root, paths, labels)
        sizes = image_sizes(paths)
        if max_resolution:
            scale = np.minimum(1.0, max_resolution / sizes.max(axis=1))
            sizes = np.maximum(1, np.round(sizes * scale[:, None])).astype(np.int64)
        splits[split] = SourceDataset(labels, FileLoader(paths, max_resolution=max_resolution), sizes)
    hasher.update(f"classes={','.join(classes)};max_resolution={max_resolution}".encode())
    return SourceSplits(train=splits["train"], test=splits["val"], classes=classes,
                        content_hash=hasher.hexdigest(), fixed_size=False)


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
        files = sorted(str(p) for p in d.iterdir() if p.is_file() and p.suffix in EXTENSIONS | {e.lower() for e in EXTENSIONS})
        if not files:
            raise UserError(f"class folder {d} is empty")
        paths += files
        labels += [label] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)

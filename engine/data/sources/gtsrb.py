"""GTSRB in the official layout.

Training: ``Final_Training/Images/<class>/*.ppm`` with ``GT-<class>.csv`` per class.
Test: ``Final_Test/Images/*.ppm`` with the labelled ``GT-final_test.csv`` (in that
folder or at the source root). Images vary in size (15 to 250 px); they are resized to
``size`` x ``size`` (32 by default, as the toolboxes do) so the set is written raw.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from engine.data.sources.base import SOURCES, ContentHasher, SourceDataset, SourceSplits
from engine.data.sources.files import FileLoader, hash_files
from engine.errors import UserError



@SOURCES.register("gtsrb")
def read(source: str | None, size: int = 32, **_: object) -> SourceSplits:
    if not source:
        raise UserError("gtsrb needs --source: the folder holding Final_Training/ and Final_Test/")
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"gtsrb source not found: {root}")
    for sub in ("GTSRB",):  # the official zips extract into GTSRB/
        if not (root / "Final_Training").is_dir() and (root / sub / "Final_Training").is_dir():
            root = root / sub
    train_dir = root / "Final_Training" / "Images"
    if not train_dir.is_dir():
        raise UserError(f"{root} is not a GTSRB folder: Final_Training/Images is missing")
    train_paths, train_labels = _read_train(train_dir)
    test_paths, test_labels = _read_test(root)

    hasher = ContentHasher()
    hash_files(hasher, root, train_paths, train_labels)
    hash_files(hasher, root, test_paths, test_labels)
    hasher.update(f"size={size}".encode())
    n = int(train_labels.max()) + 1  # 43 for the real set
    sizes = lambda k: np.tile([size, size], (k, 1))  # noqa: E731 - resized at load
    return SourceSplits(
        train=SourceDataset(train_labels, FileLoader(train_paths, resize=size), sizes(len(train_paths))),
        test=SourceDataset(test_labels, FileLoader(test_paths, resize=size), sizes(len(test_paths))),
        classes=[f"{c:05d}" for c in range(n)],
        content_hash=hasher.hexdigest(),
        fixed_size=True,
        notes={"resize": f"bilinear to {size}x{size}"},
    )


def _rows(csv_path: Path) -> list[dict]:
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";"))
    except OSError as e:
        raise UserError(f"cannot read {csv_path}: {e}") from None
    if rows and ("Filename" not in rows[0] or "ClassId" not in rows[0]):
        raise UserError(f"{csv_path} lacks the Filename/ClassId columns of a GTSRB annotation file")
    return rows


def _read_train(train_dir: Path) -> tuple[list[str], np.ndarray]:
    paths, labels = [], []
    class_dirs = sorted(d for d in train_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise UserError(f"{train_dir} has no class folders")
    for d in class_dirs:
        csvs = sorted(d.glob("GT-*.csv"))
        if not csvs:
            raise UserError(f"GTSRB class folder {d} has no GT-*.csv annotation file")
        rows = _rows(csvs[0])
        if not rows:
            raise UserError(f"GTSRB class {d.name} is empty ({csvs[0].name} lists no image)")
        for r in rows:
            p = d / r["Filename"]
            if not p.is_file():
                raise UserError(f"{csvs[0]} lists {r['Filename']}, which is missing")
            paths.append(str(p))
            labels.append(int(r["ClassId"]))
    return paths, np.asarray(labels, dtype=np.int64)


def _read_test(root: Path) -> tuple[list[str], np.ndarray]:
    img_dir = root / "Final_Test" / "Images"
    candidates = [img_dir / "GT-final_test.csv", root / "GT-final_test.csv"]
    gt = next((c for c in candidates if c.is_file()), None)
    if not img_dir.is_dir() or gt is None:
        raise UserError(f"{root} lacks the GTSRB test split: Final_Test/Images and the labelled GT-final_test.csv")
    rows = _rows(gt)
    if not rows:
        raise UserError(f"{gt} lists no test image")
    paths, labels = [], []
    for r in rows:
        p = img_dir / r["Filename"]
        if not p.is_file():
            raise UserError(f"{gt} lists {r['Filename']}, which is missing")
        paths.append(str(p))
        labels.append(int(r["ClassId"]))
    return paths, np.asarray(labels, dtype=np.int64)

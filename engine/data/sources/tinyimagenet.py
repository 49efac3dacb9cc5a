"""Tiny-ImageNet-200 in its release layout (``tiny-imagenet-200.zip`` extracted)::

    wnids.txt                      the 200 class ids, one per line: label i = line i
    words.txt                      optional: ``wnid<TAB>names``, kept as class names
    train/<wnid>/images/*.JPEG     500 per class (train/<wnid>/<wnid>_boxes.txt ignored)
    val/images/*.JPEG              the 10,000 labelled validation images: the test split
    val/val_annotations.txt        ``file<TAB>wnid<TAB>box...``, one line per val image

The unlabelled ``test/`` folder is ignored. Labels follow ``wnids.txt``'s line order, as
BackdoorBench's ``utils/dataset/Tiny.py`` builds them (not the sorted order of
torchvision's ImageFolder); training images are taken per class in that order and, in a
class, by the number in ``<wnid>_<n>.JPEG`` (BackdoorBench's 0..499 order); the test split
is ``val_annotations.txt``'s order. Every image must be 64x64 (some are greyscale: they
become RGB, like BackdoorBench's ``convert("RGB")``) and is written raw, exactly; the
release has no other size, and a tree that does is refused rather than resized.

Every file is decoded once while the layout is checked, so a broken JPEG, a stray
folder or a bad annotation line fails with one line naming it before any ``.beton``.
"""
from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.data.sources.base import SOURCES, ContentHasher, SourceDataset, SourceSplits
from engine.data.sources.files import FileLoader, hash_files
from engine.errors import UserError

SIZE = 64
EXTENSIONS = {".jpeg", ".jpg", ".png"}


@SOURCES.register("tinyimagenet")
def read(source: str | None, **_: object) -> SourceSplits:
    if not source:
        raise UserError("tinyimagenet needs --source: the tiny-imagenet-200 folder")
    root = Path(source)
    if not root.is_dir():
        raise UserError(f"tinyimagenet source not found: {root}")
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200" / "wnids.txt").is_file():
        root = root / "tiny-imagenet-200"
    wnids = _wnids(root / "wnids.txt")
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_labels = _train(root / "train", wnids, index)
    test_paths, test_labels = _val(root / "val", index)
    _check_images(train_paths + test_paths)

    hasher = ContentHasher()
    hasher.update(("wnids=" + ",".join(wnids)).encode())
    hash_files(hasher, root, train_paths, train_labels)
    hash_files(hasher, root, test_paths, test_labels)
    sizes = lambda k: np.tile([SIZE, SIZE], (k, 1))  # noqa: E731 - checked above
    notes = {"test_split": "val (val/val_annotations.txt)", "label_order": "wnids.txt"}
    names = _words(root / "words.txt", wnids)
    if names:
        notes["class_names"] = names
    return SourceSplits(
        train=SourceDataset(train_labels, FileLoader(train_paths), sizes(len(train_paths))),
        test=SourceDataset(test_labels, FileLoader(test_paths), sizes(len(test_paths))),
        classes=wnids,
        content_hash=hasher.hexdigest(),
        fixed_size=True,
        notes=notes,
    )


def _wnids(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a Tiny-ImageNet folder: wnids.txt is missing")
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise UserError(f"{path} lists no class")
    seen = set()
    for w in wnids:
        if w in seen:
            raise UserError(f"{path} lists {w} twice")
        seen.add(w)
    return wnids


def _words(path: Path, wnids: list[str]) -> list[str]:
    """Class names in label order from words.txt (all of WordNet's 82k ids); the wnid
    itself where the file is absent or lacks it."""
    if not path.is_file():
        return []
    wanted, names = set(wnids), {}
    for line in path.read_text(errors="replace").splitlines():
        wnid, _, words = line.partition("\t")
        if wnid in wanted:
            names[wnid] = words.strip() or wnid
    return [names.get(w, w) for w in wnids]


def _order(wnid: str, name: str) -> tuple:
    m = re.fullmatch(re.escape(wnid) + r"_(\d+)\.\w+", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def _train(train_dir: Path, wnids: list[str], index: dict[str, int]) -> tuple[list[str], np.ndarray]:
    if not train_dir.is_dir():
        raise UserError(f"{train_dir.parent} is not a Tiny-ImageNet folder: train/ is missing")
    for d in sorted(train_dir.iterdir()):
        if d.is_dir() and d.name not in index:
            raise UserError(f"train folder {d} is not a class of {train_dir.parent / 'wnids.txt'}")
    paths, labels = [], []
    for w in wnids:
        img_dir = train_dir / w / "images"
        if not img_dir.is_dir():
            raise UserError(f"Tiny-ImageNet class {w} has no training images: {img_dir} is missing")
        files = sorted((p.name for p in img_dir.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS),
                       key=lambda n: _order(w, n))
        if not files:
            raise UserError(f"Tiny-ImageNet training folder {img_dir} holds no image")
        paths += [str(img_dir / f) for f in files]
        labels += [index[w]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _val(val_dir: Path, index: dict[str, int]) -> tuple[list[str], np.ndarray]:
    ann = val_dir / "val_annotations.txt"
    if not ann.is_file():
        raise UserError(f"{val_dir.parent} lacks the Tiny-ImageNet test split: {ann} is missing")
    wnids_txt = val_dir.parent / "wnids.txt"
    paths, labels, seen = [], [], set()
    for n, line in enumerate(ann.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise UserError(f"{ann} line {n}: expected 'file<TAB>wnid<TAB>box...', got {line[:80]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise UserError(f"{ann} line {n}: class {wnid} is not in {wnids_txt}")
        if name in seen:
            raise UserError(f"{ann} line {n}: {name} is listed twice")
        seen.add(name)
        p = val_dir / "images" / name
        if not p.is_file():
            raise UserError(f"{ann} line {n} lists {name}, which is missing from {p.parent}")
        paths.append(str(p))
        labels.append(index[wnid])
    if not paths:
        raise UserError(f"{ann} lists no image")
    return paths, np.asarray(labels, dtype=np.int64)


def _check_images(paths: list[str], threads: int = 8) -> None:
    """Decode every image (a header check misses a truncated JPEG) and check its size."""
    from PIL import Image

    def check(p: str) -> str | None:
        try:
            with Image.open(p) as im:
                im.load()
                size = im.size
        except Exception as e:  # PIL raises many types for broken files
            return f"unreadable image {p}: {' '.join(str(e).split())}"
        if size != (SIZE, SIZE):
            return (f"image {p} is {size[0]}x{size[1]}, not {SIZE}x{SIZE}: every Tiny-ImageNet image is "
                    f"{SIZE}x{SIZE} (resize the tree yourself, or use `dbd prepare imagefolder`)")
        return None

    with ThreadPoolExecutor(threads) as pool:
        for problem in pool.map(check, paths):
            if problem:
                raise UserError(problem)

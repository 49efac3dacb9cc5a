"""The data sets the benchmarks read, cached in ``$DBD_BENCH_CACHE`` (default: in the temp dir): CIFAR-size
random images, and ImageFolder trees of photo crops with their ``dbd prepare`` store (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when what a cached set holds changes, so stale caches are not reused.
FORMAT = 4
NUM_CLASSES = 10
JPEG_QUALITY = 90
TEST_COUNT = 64  # build_poison reads the test split; the benchmarks never load it


def cache_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("DBD_BENCH_CACHE") or Path(tempfile.gettempdir()) / f"dbd-bench-cache-{uid}")


@dataclass
class BenchSet:
    root: Path  # the prepared folder (train.beton, test.beton, meta.json)
    meta: dict
    labels: np.ndarray  # int64[N], clean training labels in the .beton's order
    images: np.ndarray | None  # uint8 (N, 32, 32, 3): the reference's in-memory copy (CIFAR-size)
    jpeg_paths: list[str] | None  # the reference's JPEG file of each .beton sample (ImageNet-size)


def cifar_like(n: int, seed: int = 0) -> BenchSet:
    """``n`` random 32x32 images in 10 balanced classes, in memory and as ``dbd prepare cifar10`` stores them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int64)
    rng.shuffle(labels)
    root = cache_dir() / f"cifar32-n{n}-s{seed}-v{FORMAT}"
    if not (root / "meta.json").is_file():  # prepare writes it last
        from engine.data.prepare import prepare
        test = rng.integers(0, 256, size=(TEST_COUNT, 32, 32, 3), dtype=np.uint8)
        _write_cifar_release(root / "release", images, labels, test)
        prepare("cifar10", str(root / "release"), root, progress=False, force=True)
        shutil.rmtree(root / "release")
    return BenchSet(root, json.loads((root / "meta.json").read_text()), labels, images, None)


def _write_cifar_release(folder: Path, images: np.ndarray, labels: np.ndarray, test: np.ndarray) -> None:
    """CIFAR-10's Python-pickle release layout: five training batches, the test batch and the class names."""
    def batch(name: str, x: np.ndarray, y) -> None:
        planar = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # the release stores (N, 3x32x32)
        (folder / name).write_bytes(pickle.dumps({b"data": planar, b"labels": [int(v) for v in y]}))
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(len(images)), 5)):
        batch(f"data_batch_{i + 1}", images[part], labels[part])
    batch("test_batch", test, np.arange(len(test)) % NUM_CLASSES)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"class{c}" for c in range(NUM_CLASSES)]}))


def imagenet_like(n: int, seed: int = 0) -> BenchSet:
    """``n`` photo crops of about 400x350: JPEG files in an ImageFolder tree (the reference reads
    them) and that tree as ``dbd prepare imagefolder`` stores it, at 256 px (the engine reads it)."""
    from engine.data.prepare import WriterSettings, prepare
    tree = Path(synthetic_tree(n, TEST_COUNT, seed=seed)["root"])
    root = tree / "prepared-d256"
    if not (root / "meta.json").is_file():  # prepare writes it last
        prepare("imagefolder", str(tree), root, writer=WriterSettings(decode_size=256), progress=False, force=True)
    return prepared_set(root, tree)


def prepared_set(root: Path, tree: Path) -> BenchSet:
    """The prepared ``root`` of ImageFolder ``tree``, with each sample's JPEG file: prepare stores the class
    folders in sorted order, each one's files sorted by name, so .beton index i is the i-th sorted path."""
    from engine.data.prepare import load_meta
    meta = load_meta(root)
    paths = sorted(str(p) for p in (tree / "train").glob("class*/*.jpg"))
    labels = np.array([meta["classes"].index(Path(p).parent.name) for p in paths], dtype=np.int64)
    return BenchSet(Path(root), meta, labels, None, paths)


def poison_runtime(bench: BenchSet, *, image_size: int | None = None, decode_size: int | None = None,
                   attack: str = "badnets", ratio: float = 0.1, target: int = 0, num_workers: int = 2):
    """The engine's poisoning of ``bench`` by ``attack`` (BadNets: BackdoorBench's white 3x3 patch), ``ratio``
    of all samples: a PoisonRuntime built in memory, and its config. The sizes default to what the loader
    delivers: 32 px from a raw set; 224 px from a JPEG set, the trigger drawn on its decoded 256 px frame."""
    from engine.attacks.runtime import build_poison
    from engine.config import load_config
    jpeg = bench.jpeg_paths is not None
    image_size = image_size or (224 if jpeg else 32)
    decode_size = (256 if jpeg else 0) if decode_size is None else decode_size
    cfg = load_config(None, [f"data.name={bench.meta['name']}", f"data.root={bench.root}",
                             f"data.image_size={image_size}", f"data.decode_size={decode_size}",
                             f"data.num_workers={num_workers}", f"attack.name={attack}",
                             f"attack.target={target}", f"attack.ratio={ratio}", "attack.select_from=all"])
    return build_poison(cfg, bench.meta, None), cfg


def synthetic_tree(n: int, val_n: int, budget_s: float = float("inf"), seed: int = 0) -> dict:
    """An ImageFolder tree of ``val_n`` validation crops and (at most) ``n`` training crops, these
    written within ``budget_s`` seconds; or the cached tree. Returns its record, from the run that wrote it."""
    from engine.fsutil import write_json
    root = cache_dir() / f"tree-n{n}-val{val_n}-s{seed}-v{FORMAT}"
    if (root / "tree.json").is_file():  # written last: present means complete
        return {**json.loads((root / "tree.json").read_text()), "root": str(root), "cached": True}
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    _write_crops(root / "val", val_n, rng, float("inf"))
    t0 = time.perf_counter()
    files = _write_crops(root / "train", n, rng, t0 + budget_s)
    rec = {"train_images": files, "write_seconds": time.perf_counter() - t0, "budget_cut": files < n,
           "bytes_per_source_file": sum(p.stat().st_size for p in (root / "train").rglob("*.jpg")) / max(files, 1),
           "jpeg_quality": JPEG_QUALITY}
    write_json(root / "tree.json", rec)
    return {**rec, "root": str(root), "cached": False}


def _write_crops(folder: Path, count: int, rng: np.random.Generator, deadline: float) -> int:
    """Up to ``count`` crops of sklearn's two sample photos into ``folder``'s class folders until ``deadline``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images  # 427x640
    for i in range(count):
        if time.perf_counter() > deadline:
            return i
        # About 400x350, sizes varying as ImageNet's do, mirrored half the time.
        h, w, photo = int(rng.integers(330, 371)), int(rng.integers(380, 421)), photos[i % len(photos)]
        top, left = int(rng.integers(0, photo.shape[0] - h + 1)), int(rng.integers(0, photo.shape[1] - w + 1))
        crop = photo[top:top + h, left:left + w]
        path = folder / f"class{i % NUM_CLASSES}" / f"{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)).save(
            path, format="JPEG", quality=JPEG_QUALITY)
    return count

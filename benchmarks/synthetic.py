"""The data sets the benchmarks read, built once and cached in ``$DBD_BENCH_CACHE``
(default: a folder in the system temp dir): CIFAR-size random images and ImageNet-size
photo crops, each written for both sides of a comparison from the same pixels, and the
scale benchmark's ImageFolder tree (what each holds: docs/benchmarks.md)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Bump when what a cached set holds changes, so stale caches are not reused.
FORMAT = 3
NUM_CLASSES = 10
JPEG_QUALITY = 90
TEST_COUNT = 64  # build_poison reads the test labels; the benchmarks never load them


def cache_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get("DBD_BENCH_CACHE") or Path(tempfile.gettempdir()) / f"dbd-bench-cache-{uid}")


@dataclass
class BenchSet:
    root: Path  # the prepared folder (train.beton, test.beton, meta.json)
    meta: dict
    labels: np.ndarray  # int64[N], clean training labels
    images: np.ndarray | None  # uint8 (N, 32, 32, 3): the in-memory reference copy (CIFAR-size)
    jpeg_paths: list[str] | None  # JPEG files of the training images (ImageNet-size)


def _write_set(root: Path, name: str, train_images, labels, test_images, test_labels, fixed: bool,
               decode_size: int = 0) -> dict:
    from engine.data.beton import write_beton
    from engine.fsutil import write_json
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, imgs, labs in (("train", train_images, labels), ("test", test_images, test_labels)):
        if decode_size:
            from engine.data.decode_geometry import to_decode_geometry
            imgs = [to_decode_geometry(im, decode_size) for im in imgs]
        write_beton(root / f"{split}.beton", [(im, int(y), i) for i, (im, y) in enumerate(zip(imgs, labs))],
                    fixed_size=fixed, write_mode="raw" if fixed else "jpg", max_resolution=0 if fixed else 512,
                    jpeg_quality=JPEG_QUALITY, num_workers=max(1, min(2, os.cpu_count() or 1)), progress=False)
        values, counts = np.unique(labs, return_counts=True)
        sz = np.array([im.shape[:2] for im in imgs], dtype=np.int64)
        splits[split] = {"count": int(len(labs)),
                         "label_histogram": {str(int(v)): int(c) for v, c in zip(values, counts)},
                         "height": [int(sz[:, 0].min()), int(sz[:, 0].max())],
                         "width": [int(sz[:, 1].min()), int(sz[:, 1].max())]}
    h = hashlib.sha256(f"{name}:{FORMAT}".encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    meta = {"name": name, "classes": [f"class{c}" for c in range(NUM_CLASSES)], "num_classes": NUM_CLASSES,
            "splits": splits, "fixed_size": fixed, "content_hash": h.hexdigest(), "source": None,
            "writer": {"write_mode": "raw" if fixed else "jpg", "jpeg_quality": JPEG_QUALITY,
                       "decode_size": decode_size, "fields": ["image", "label", "index"]},
            "notes": {"synthetic": True, "format": FORMAT}, "seconds": 0.0}
    write_json(root / "meta.json", meta)  # last: its presence marks a complete set
    return meta


def _load_meta(root: Path) -> dict | None:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("notes", {}).get("format") == FORMAT else None


def cifar_like(n: int, seed: int = 0) -> BenchSet:
    """``n`` random 32x32 images in 10 balanced classes, raw ``.beton`` + in-memory array."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int64)
    rng.shuffle(labels)
    root = cache_dir() / f"cifar32-n{n}-s{seed}-v{FORMAT}"
    meta = _load_meta(root)
    if meta is None:
        test = rng.integers(0, 256, size=(TEST_COUNT, 32, 32, 3), dtype=np.uint8)
        meta = _write_set(root, "bench-cifar32", images, labels, test,
                          (np.arange(TEST_COUNT) % NUM_CLASSES).astype(np.int64), fixed=True)
    return BenchSet(root=root, meta=meta, labels=labels, images=images, jpeg_paths=None)


def _photo_crops(n: int, seed: int) -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images  # two 427x640 photos
    rng = np.random.default_rng(seed)
    return [photo_crop(photos[i % len(photos)], rng) for i in range(n)]


def photo_crop(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crop of about 400x350 (sizes vary, as real ImageNet's do) from ``img``, mirrored
    half the time, drawn from ``rng``."""
    h, w = int(rng.integers(330, 371)), int(rng.integers(380, 421))
    top = int(rng.integers(0, img.shape[0] - h + 1))
    left = int(rng.integers(0, img.shape[1] - w + 1))
    crop = img[top:top + h, left:left + w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


def save_jpeg(image: np.ndarray, path: Path) -> None:
    """``image`` as a JPEG at ``JPEG_QUALITY``, written under a temporary name first (a
    ``.tmp`` file left by a stopped writer is never taken for an image)."""
    from PIL import Image
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, path)


def imagenet_like(n: int, seed: int = 0, decode_size: int = 256) -> BenchSet:
    """``n`` photo crops of about 400x350 as JPEG files and as a JPEG ``.beton`` stored at
    ``decode_size`` (0: source resolution)."""
    from PIL import Image
    root = cache_dir() / f"jpeg400-n{n}-s{seed}-d{decode_size}-v{FORMAT}"
    files = root / "jpeg"
    labels = (np.arange(n) % NUM_CLASSES).astype(np.int64)
    paths = [str(files / f"{i:06d}.jpg") for i in range(n)]
    meta = _load_meta(root)
    if meta is None or not all(Path(p).is_file() for p in paths):
        files.mkdir(parents=True, exist_ok=True)
        crops = _photo_crops(n + TEST_COUNT, seed)
        decoded = []
        for i, crop in enumerate(crops[:n]):
            save_jpeg(crop, Path(paths[i]))
            # The .beton gets the pixels the reference will decode, so both sides
            # start from the same image content.
            with Image.open(paths[i]) as im:
                decoded.append(np.asarray(im.convert("RGB")))
        test = crops[n:]
        meta = _write_set(root, "bench-jpeg400", decoded, labels, test,
                          (np.arange(TEST_COUNT) % NUM_CLASSES).astype(np.int64), fixed=False,
                          decode_size=decode_size)
    return BenchSet(root=root, meta=meta, labels=labels, images=None, jpeg_paths=paths)


def poison_runtime(bench: BenchSet, *, image_size: int, decode_size: int, attack: str = "badnets",
                   ratio: float = 0.1, target: int = 0, num_workers: int = 2):
    """The engine's poisoning of ``bench`` by ``attack`` (BadNets: BackdoorBench's white
    3x3 patch), ``ratio`` of all samples: a PoisonRuntime built in memory, and its config."""
    from engine.attacks.runtime import build_poison
    from engine.config import load_config
    cfg = load_config(None, [f"data.name={bench.meta['name']}", f"data.root={bench.root}",
                             f"data.image_size={image_size}", f"data.decode_size={decode_size}",
                             f"data.num_workers={num_workers}", f"attack.name={attack}",
                             f"attack.target={target}", f"attack.ratio={ratio}", "attack.select_from=all"])
    return build_poison(cfg, bench.meta, None), cfg


# --------------------------------------------------------------------------- the scale benchmark's ImageFolder tree

TREE_FORMAT = 1

_PHOTOS = None


def _init_writer() -> None:
    global _PHOTOS
    from sklearn.datasets import load_sample_images
    _PHOTOS = load_sample_images().images  # two 427x640 photos


def _write_chunk(job: tuple[str, int, int, int]) -> None:
    """Write crops ``start .. stop-1`` of one split (``benchmarks.synthetic.photo_crop``,
    seeded per index so any worker can draw any crop)."""
    folder, start, stop, seed = job
    for i in range(start, stop):
        save_jpeg(photo_crop(_PHOTOS[i % len(_PHOTOS)], np.random.default_rng([seed, i])),
                  Path(folder) / f"class{i % NUM_CLASSES}" / f"{i:07d}.jpg")


def _write_split(pool, folder: Path, start: int, count: int, seed: int, deadline: float | None,
                 chunk: int = 64) -> None:
    for c in range(NUM_CLASSES):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder), s, min(s + chunk, start + count), seed) for s in range(start, start + count, chunk)]
    for _ in pool.imap_unordered(_write_chunk, jobs):
        if deadline is not None and time.perf_counter() > deadline:
            break  # the caller terminates the pool: chunks in flight stop where they are


def _count(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*.jpg") if not p.name.startswith(".")]
    for p in folder.rglob(".*.tmp"):
        p.unlink()
    return len(files), sum(p.stat().st_size for p in files)


def synthetic_tree(n: int, val_n: int, budget_s: float, workers: int, seed: int = 0) -> dict:
    """The ImageFolder tree of (at most) ``n`` training crops, written within ``budget_s``
    seconds by ``workers`` processes, or reused from the cache. Returns its record (the
    writing's own figures, from the run that wrote it)."""
    import multiprocessing as mp
    from engine.fsutil import write_json
    root = cache_dir() / f"scale-tree-n{n}-s{seed}-v{TREE_FORMAT}"
    marker = root / "tree.json"
    if marker.is_file():
        try:
            rec = json.loads(marker.read_text())
            if rec.get("format") == TREE_FORMAT:
                return {**rec, "root": str(root), "cached": True}
        except (OSError, json.JSONDecodeError):
            pass
    shutil.rmtree(root, ignore_errors=True)
    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_init_writer) as pool:
        _write_split(pool, root / "val", 10_000_000, val_n, seed, None)  # val: its own index range
        t0 = time.perf_counter()
        _write_split(pool, root / "train", 0, n, seed, t0 + budget_s)
        pool.terminate()
        pool.join()
        seconds = time.perf_counter() - t0
    files, nbytes = _count(root / "train")
    val_files, _ = _count(root / "val")
    rec = {"format": TREE_FORMAT, "target_images": n, "train_images": files, "val_images": val_files,
           "write_seconds": seconds, "write_workers": workers, "train_bytes": nbytes,
           "source_files_per_s": files / seconds, "source_files_per_s_per_core": files / seconds / workers,
           "bytes_per_source_file": nbytes / max(files, 1), "budget_s": budget_s, "budget_cut": files < n,
           "jpeg_quality": JPEG_QUALITY, "crop": "about 400x350 (h 330-370, w 380-420) of sklearn's two sample photos"}
    write_json(marker, rec)  # last: its presence marks a complete tree
    return {**rec, "root": str(root), "cached": False}


def subset_tree(tree: Path, dest: Path, n: int) -> int:
    """A tree of symlinks to the first ``n`` training files (all of val)."""
    shutil.rmtree(dest, ignore_errors=True)
    files = sorted((tree / "train").rglob("*.jpg"))[:n]
    for p in files:
        link = dest / "train" / p.parent.name / p.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p)
    (dest / "val").symlink_to(tree / "val")
    return len(files)

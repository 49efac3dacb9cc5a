"""``dbd prepare``: a dataset in its on-disk format -> train/test ``.beton`` + meta.json."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.beton import write_beton
from engine.data.decode_geometry import DEFAULT_DECODE_SIZE
from engine.data.sources import read_source
from engine.errors import UserError
from engine.fsutil import write_json

META = "meta.json"


@dataclass
class WriterSettings:
    write_mode: str = ""  # "" = raw for fixed-size sets, jpg for variable-size ones
    max_resolution: int = 512
    jpeg_quality: int = 90
    num_workers: int = 0  # 0 = all cores
    # imagefolder: store each image as its centre square at this side (the loader's
    # training frame); 0 = source resolution, capped by max_resolution
    decode_size: int = DEFAULT_DECODE_SIZE


def prepare(dataset: str, source: str | None, out: str | Path, *, force: bool = False,
            classes_file: str | None = None, size: int = 32, writer: WriterSettings | None = None,
            progress: bool = True) -> dict:
    writer = writer or WriterSettings()
    out = Path(out)
    targets = [out / "train.beton", out / "test.beton", out / META]
    existing = [t for t in targets if t.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; pass --force to replace it")
    if writer.write_mode not in ("", "raw", "jpg", "smart"):
        raise UserError(f"--write-mode must be raw, jpg or smart, got {writer.write_mode!r}")
    if not 1 <= writer.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in [1, 100], got {writer.jpeg_quality}")

    t0 = time.time()
    splits = read_source(dataset, source, classes_file=classes_file, size=size,
                         max_resolution=writer.max_resolution, decode_size=writer.decode_size)
    mode = writer.write_mode or ("raw" if splits.fixed_size else "jpg")
    workers = writer.num_workers or os.cpu_count() or 1
    for name, ds in (("train", splits.train), ("test", splits.test)):
        if len(ds) == 0:
            raise UserError(f"{dataset} {name} split is empty")
        empty = [splits.classes[c] for c in range(len(splits.classes))
                 if name == "train" and not (ds.labels == c).any()]
        if empty:
            raise UserError(f"{dataset} train split has no image of class {empty[0]!r}")
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name, ds in (("train", splits.train), ("test", splits.test)):
        write_beton(out / f"{name}.beton", ds, fixed_size=splits.fixed_size, write_mode=mode,
                    max_resolution=writer.max_resolution if not splits.fixed_size else 0,
                    jpeg_quality=writer.jpeg_quality, num_workers=min(workers, max(1, len(ds) // 2000)),
                    progress=progress)
        sizes = ds.sizes()
        values, counts = np.unique(ds.labels, return_counts=True)
        summaries[name] = {
            "count": int(len(ds)),
            "label_histogram": {str(int(v)): int(c) for v, c in zip(values, counts)},
            "height": [int(sizes[:, 0].min()), int(sizes[:, 0].max())],
            "width": [int(sizes[:, 1].min()), int(sizes[:, 1].max())],
        }
    meta = {
        "name": dataset,
        "classes": splits.classes,
        "num_classes": len(splits.classes),
        "splits": summaries,
        "fixed_size": splits.fixed_size,
        "content_hash": splits.content_hash,
        "source": str(Path(source).resolve()) if source else None,
        "writer": {"write_mode": mode, "max_resolution": writer.max_resolution if not splits.fixed_size else None,
                   "jpeg_quality": writer.jpeg_quality, "decode_size": splits.decode_size,
                   "fields": ["image", "label", "index"]},
        "notes": splits.notes,
        "seconds": round(time.time() - t0, 2),
    }
    write_json(out / META, meta)
    return meta


def load_meta(root: str | Path) -> dict:
    path = Path(root) / META
    if not path.is_file():
        raise UserError(f"{path} not found: point data.root at a folder written by `dbd prepare`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None


def describe(meta: dict) -> str:
    lines = [f"dataset {meta['name']}: {meta['num_classes']} classes, content hash {meta['content_hash'][:12]}"]
    for split, s in meta["splits"].items():
        lines.append(f"  {split:<5} {s['count']:>7} images, height {s['height'][0]}-{s['height'][1]}, "
                     f"width {s['width'][0]}-{s['width'][1]}")
    hist = meta["splits"]["train"]["label_histogram"]
    lines.append("  train labels: " + ", ".join(f"{meta['classes'][int(k)]}:{v}" for k, v in hist.items()))
    lines.append(f"  written {meta['writer']['write_mode']} in {meta['seconds']} s")
    return "\n".join(lines)

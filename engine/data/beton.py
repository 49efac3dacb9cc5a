"""Writing and checking ``.beton`` files.

The FFCV writer's progress loop waits forever if a worker process dies (a corrupt
image, out of memory); :class:`GuardedWriter` watches the workers and fails instead.
Every file is written under a temporary name and renamed only once complete.
"""
from __future__ import annotations

import ctypes
import os
from multiprocessing import Process, Queue, Value
from pathlib import Path
from time import sleep

import numpy as np

from engine.errors import UserError

# Field order is part of the format: the loaders address fields by these names.
FIELDS = ("image", "label", "index")


def _writer_class():
    from ffcv.writer import DatasetWriter, MemoryAllocator

    class GuardedWriter(DatasetWriter):
        """DatasetWriter whose progress loop notices a dead worker."""

        def __init__(self, *args, progress: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.progress = progress

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            from tqdm import tqdm

            self.num_samples = num_samples
            self.prepare()
            work: Queue = Queue()
            for todo in queue_content:
                work.put(todo)
            for _ in range(self.num_workers):
                work.put(None)
            allocations: Queue = Queue()
            done = Value(ctypes.c_uint64, 0)
            allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
            args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                    allocations, *extra_worker_args)
            procs = [Process(target=work_fn, args=args, daemon=True) for _ in range(self.num_workers)]
            for p in procs:
                p.start()
            bar = tqdm(total=num_samples, unit="img", disable=not self.progress, leave=False)
            try:
                seen = 0
                while seen != num_samples:
                    val = done.value
                    bar.update(val - seen)
                    seen = val
                    failed = [p for p in procs if p.exitcode not in (None, 0)]
                    if failed:
                        raise UserError(f"writing {Path(self.fname).name} failed: a writer process exited "
                                        f"with status {failed[0].exitcode} (see the message above)")
                    sleep(0.05)
                allocation_list = []
                for _ in procs:
                    allocation_list.extend(allocations.get())
                for p in procs:
                    p.join()
                self.finalize(allocation_list)
            finally:
                bar.close()
                for p in procs:
                    if p.is_alive():
                        p.terminate()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return GuardedWriter


def write_beton(path: Path, dataset, *, fixed_size: bool, write_mode: str, max_resolution: int,
                jpeg_quality: int, num_workers: int, progress: bool = True) -> None:
    """Write ``dataset`` (indexable ``(image, label, index)``) to ``path`` atomically."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import MIN_PAGE_SIZE

    image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution or None,
                                jpeg_quality=jpeg_quality)
    fields = {"image": image_field, "label": IntField(), "index": IntField()}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        # Each writer process fills whole pages; small pages keep small sets small on disk.
        page = MIN_PAGE_SIZE if fixed_size else 4 * MIN_PAGE_SIZE
        writer = _writer_class()(str(tmp), fields, page_size=page, num_workers=num_workers, progress=progress)
        writer.from_indexed_dataset(dataset, chunksize=64)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class BetonSummary:
    """What ``dbd inspect`` reports, read from the header and metadata only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        reader = open_beton(self.path)
        self.num_samples = int(reader.num_samples)
        self.field_names = list(reader.field_names)
        meta = reader.metadata
        names = meta.dtype.names
        by_field = dict(zip(self.field_names, names))
        if "image" not in by_field or "label" not in by_field:
            raise UserError(f"{self.path} has fields {self.field_names}; expected image and label")
        img = meta[by_field["image"]]
        self.heights = np.asarray(img["height"], dtype=np.int64)
        self.widths = np.asarray(img["width"], dtype=np.int64)
        self.modes = np.asarray(img["mode"])
        self.labels = np.asarray(meta[by_field["label"]], dtype=np.int64).reshape(-1)
        self.page_size = int(reader.page_size)

    def histogram(self) -> dict[int, int]:
        values, counts = np.unique(self.labels, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def size_range(self) -> dict[str, list[int]]:
        if self.num_samples == 0:
            return {"height": [0, 0], "width": [0, 0]}
        return {"height": [int(self.heights.min()), int(self.heights.max())],
                "width": [int(self.widths.min()), int(self.widths.max())]}

    def describe(self, classes: list[str] | None = None) -> str:
        sr = self.size_range()
        # FFCV's IMAGE_MODES: 0 = jpg, 1 = raw
        mode = "jpeg" if (self.modes == 0).all() else "raw" if (self.modes == 1).all() else "mixed raw/jpeg"
        lines = [f"{self.path}: {self.num_samples} samples, fields {', '.join(self.field_names)}",
                 f"  images: {mode}, height {sr['height'][0]}-{sr['height'][1]}, "
                 f"width {sr['width'][0]}-{sr['width'][1]}",
                 "  labels:"]
        hist = self.histogram()
        peak = max(hist.values(), default=1)
        for label, count in hist.items():
            name = f" {classes[label]}" if classes and label < len(classes) else ""
            bar = "#" * max(1, round(30 * count / peak))
            lines.append(f"    {label:>4}{name:<12} {count:>8}  {bar}")
        return "\n".join(lines)


def open_beton(path: str | Path):
    """Open a ``.beton`` with FFCV's reader after checking its structure.

    FFCV's reader trusts the file: a truncated one reads garbage pointers and fails
    much later inside the loader. Check header, alloc table and data pointers first.
    """
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    size = path.stat().st_size
    bad = f"{path} is not a complete .beton file"
    if size < HeaderType.itemsize:
        raise UserError(f"{bad} (only {size} bytes)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise UserError(f"{bad} (format version {int(header['version'])}, expected {CURRENT_VERSION})")
    table_ptr = int(header["alloc_table_ptr"])
    if table_ptr == 0 or table_ptr > size or (size - table_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise UserError(f"{bad} (truncated or corrupt: allocation table at {table_ptr}, file size {size})")
    try:
        reader = Reader(str(path))
    except Exception as e:  # FFCV raises assorted types for a damaged header
        raise UserError(f"{bad} ({e})") from None
    table = reader.alloc_table
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_ptr:
        raise UserError(f"{bad} (a sample points past the data region)")
    if reader.num_samples and len(table) == 0:
        raise UserError(f"{bad} (no allocation table)")
    return reader

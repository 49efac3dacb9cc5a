"""``data.decode_device: cuda``: JPEG ``.beton`` data decoded on the GPU, trigger included.

The FFCV loader decodes every JPEG on the host (libjpeg-turbo, numba threads) and copies
the pixels to the device. This loader leaves the host only the file read: each batch's
JPEG bytes are sliced from the memory-mapped ``.beton``, decoded together by nvJPEG
(``torchvision.io.decode_jpeg(list, device="cuda")``), framed like the FFCV loader
(centre crop of ``crop_ratio(train)`` of the shorter side, resized to the decode size),
triggered on the device by the attack's device twin (``engine.attacks.device``) and
relabelled by the poison plan. Batches are ``(images uint8 NHWC, labels int64, indices
int64)`` like ``make_loader``'s: images and labels on the device, indices on the host,
in the same order (``engine.data.order.shard_order``), so the same samples arrive in
the same batches as from the FFCV loader for the same seed, epoch and rank.

What is exact and what is not:

- the order, the batches, the labels and the indices: identical to the FFCV loader's;
- the trigger: pixel-exact, given the decoded frame (integer twins of the kernels);
- the decode: nvJPEG's IDCT and chroma upsampling may differ from libjpeg-turbo's by a
  level here and there; on the CPU (``device="cpu"``, the tests) ``decode_jpeg`` is
  libjpeg's. Pixels can therefore differ from the FFCV loader's, which is why
  ``data.decode_device`` is part of every stage's key (engine/stages/keys.py);
- the resize: a stored image that is not already ``decode_size`` square after the crop
  is resized on the device with antialiased bilinear interpolation, which is *not*
  bit-identical to the OpenCV ``INTER_AREA`` resize FFCV does. Data written with
  ``dbd prepare imagefolder --decode-size N`` is stored at the decode geometry and its
  training frame needs no resize; the evaluation frame (the centre 224/256) is resized
  on both paths.

FFCV is not needed: the ``.beton`` header, metadata and allocation table are parsed
with NumPy here (:class:`JpegBeton`), so the loader runs where only torch and
torchvision are installed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import torch

from engine.data.loaders import LoaderSpec, beton_path, check_decode_size, crop_ratio
from engine.data.order import shard_order
from engine.errors import UserError

# The .beton layout (FFCV's ffcv/types.py, format version 2), little-endian.
VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# Metadata of each field type this loader reads: float, int, RGB image.
FIELD_META = {0: np.dtype("<f8"), 1: np.dtype("<i8"),
              2: np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])}
JPG = 0  # FFCV's IMAGE_MODES["jpg"]; 1 is raw


class JpegBeton:
    """A ``.beton`` of JPEG images, read with NumPy: per sample its label, its stored
    index, its size and where its JPEG bytes lie in the memory-mapped file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"dataset file not found: {self.path}")
        bad = f"{self.path} is not a complete .beton file"
        size = self.path.stat().st_size
        if size < HEADER.itemsize:
            raise UserError(f"{bad} (only {size} bytes)")
        header = np.fromfile(self.path, dtype=HEADER, count=1)[0]
        if int(header["version"]) != VERSION:
            raise UserError(f"{bad} (format version {int(header['version'])}, expected {VERSION})")
        n, table_ptr = int(header["num_samples"]), int(header["alloc_table_ptr"])
        if table_ptr == 0 or table_ptr > size or (size - table_ptr) % ALLOC_TABLE.itemsize:
            raise UserError(f"{bad} (truncated or corrupt: allocation table at {table_ptr}, file size {size})")
        fields = np.fromfile(self.path, dtype=FIELD_DESC, count=int(header["num_fields"]), offset=HEADER.itemsize)
        names = [bytes(f["name"]).split(b"\0", 1)[0].decode() for f in fields]
        types = [int(f["type_id"]) for f in fields]
        if any(t not in FIELD_META for t in types):
            raise UserError(f"{self.path} has a field type this loader cannot read (types {types})")
        for want in ("image", "label", "index"):
            if want not in names:
                raise UserError(f"{self.path} has fields {names}; expected image, label and index")
        # The same construction as FFCV's get_metadata_type, hence the same layout.
        meta_type = np.dtype([("", FIELD_META[t]) for t in types], align=True)
        meta = np.fromfile(self.path, dtype=meta_type, count=n, offset=HEADER.itemsize + fields.nbytes)
        if len(meta) != n:
            raise UserError(f"{bad} (metadata of {len(meta)} of {n} samples)")
        image = meta[meta_type.names[names.index("image")]]
        self.labels = np.asarray(meta[meta_type.names[names.index("label")]], dtype=np.int64)
        self.stored_indices = np.asarray(meta[meta_type.names[names.index("index")]], dtype=np.int64)
        self.heights = np.asarray(image["height"], dtype=np.int64)
        self.widths = np.asarray(image["width"], dtype=np.int64)
        if n and (image["mode"] != JPG).any():
            raise UserError(f"data.decode_device=cuda needs JPEG data, but {self.path} stores "
                            f"{int((image['mode'] != JPG).sum())} of its {n} images raw "
                            "(fixed-size data is stored raw): "
                            f"use data.decode_device=cpu")
        table = np.fromfile(self.path, dtype=ALLOC_TABLE, offset=table_ptr)
        # Each image's bytes: its allocation's size (the writer allocates exactly the JPEG).
        order = np.argsort(table["ptr"])
        ptrs_sorted = table["ptr"][order]
        self.ptrs = np.asarray(image["data_ptr"], dtype=np.int64)
        at = np.searchsorted(ptrs_sorted, self.ptrs.astype(np.uint64))
        if n and ((at >= len(table)).any() or (ptrs_sorted[np.minimum(at, len(table) - 1)] != self.ptrs).any()):
            raise UserError(f"{bad} (an image has no allocation)")
        self.sizes = np.asarray(table["size"][order][at], dtype=np.int64) if n else np.zeros(0, np.int64)
        if n and int((self.ptrs + self.sizes).max()) > table_ptr:
            raise UserError(f"{bad} (a sample points past the data region)")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def jpeg_bytes(self, i: int) -> torch.Tensor:
        """Sample ``i``'s JPEG bytes, copied out of the map (``decode_jpeg`` wants a
        writable CPU tensor)."""
        p = int(self.ptrs[i])
        return torch.from_numpy(np.array(self.data[p:p + int(self.sizes[i])]))


def centre_crop(height: int, width: int, ratio: float) -> tuple[int, int, int]:
    """(top, left, side) of the centre crop: FFCV's ``get_center_crop``."""
    side = int(ratio * min(height, width))
    return (height - side) // 2, (width - side) // 2, side


def frame_images(decoded: Sequence[torch.Tensor], size: int, ratio: float) -> torch.Tensor:
    """CHW uint8 images (any sizes) as one uint8 NHWC batch of ``size`` squares: the
    centre crop, resized where it is not already ``size`` (antialiased bilinear, not
    OpenCV's INTER_AREA: see the module docstring)."""
    out = []
    for img in decoded:
        top, left, side = centre_crop(int(img.shape[1]), int(img.shape[2]), ratio)
        crop = img[:, top:top + side, left:left + side]
        if side != size:
            crop = torch.nn.functional.interpolate(crop[None].float(), size=(size, size), mode="bilinear",
                                                   align_corners=False, antialias=True)[0]
            crop = crop.round_().clamp_(0, 255).to(torch.uint8)
        out.append(crop)
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()


def decode_batch(jpegs: list[torch.Tensor], *, size: int, ratio: float, device: torch.device) -> torch.Tensor:
    """JPEG byte tensors as a uint8 NHWC batch on ``device``: one batched decode, then framing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    return frame_images(decoded, size, ratio)


class DevicePoisonOps(Protocol):
    """What an attack contributes to this loader (``engine.attacks.device.DevicePoison``
    builds it), as ``engine.data.loaders.PoisonOps`` for the FFCV loader."""

    attack: Any  # for its name in errors
    selected: np.ndarray  # bool per sample of the split
    new_labels: np.ndarray | None  # labels after poisoning; None: unchanged

    def apply(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``images`` of the samples at ``positions`` in the file, the selected ones triggered."""


class GpuDecodeLoader:
    """Batches of a JPEG ``.beton`` decoded on ``spec.device``; the FFCV loader's interface
    as the stages use it: ``indices``, ``next_epoch`` (advanced by each iteration, as
    FFCV does), ``len()``, ``set_indices`` and iteration."""

    def __init__(self, spec: LoaderSpec, poison: DevicePoisonOps | None = None):
        self.spec = spec
        self.device = torch.device(spec.device)
        check_decode_size(spec)
        self.beton = JpegBeton(beton_path(spec.root, spec.split))
        self.ratio = crop_ratio(spec.train)
        self.batch_size, self.next_epoch = spec.batch_size, 0
        n = len(self.beton)
        self.labels = self.beton.labels
        self.poison = poison
        if poison is not None:
            if len(poison.selected) != n or (poison.new_labels is not None and len(poison.new_labels) != n):
                raise UserError(f"the {poison.attack.name} poisoning was built for {len(poison.selected)} samples "
                                f"but {self.beton.path} has {n}")
            if poison.new_labels is not None:
                self.labels = np.asarray(poison.new_labels, dtype=np.int64)
        self.set_indices(np.arange(n) if spec.indices is None else spec.indices)

    def set_indices(self, indices: Sequence[int]) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) == 0:
            raise UserError(f"loader over {self.beton.path} was given an empty index subset")
        if idx.min() < 0 or idx.max() >= len(self.beton):
            raise UserError(f"loader subset has indices outside [0, {len(self.beton)})")
        self.indices = idx

    def _order(self, epoch: int) -> np.ndarray:
        s = self.spec
        return shard_order(self.indices, seed=s.seed, epoch=epoch, shuffle=s.shuffle, rank=s.rank,
                           world_size=s.world_size)

    def __len__(self) -> int:
        per_rank = len(self._order(self.next_epoch))
        return per_rank // self.batch_size if self.spec.drop_last else -(-per_rank // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order(self.next_epoch)
        order = order[:len(self) * self.batch_size]  # FFCV's cut: drop_last drops the short batch
        self.next_epoch += 1
        return self._batches(order)

    def _batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        size = self.spec.decode_size
        for start in range(0, len(order), self.batch_size):
            ids = order[start:start + self.batch_size]
            images = decode_batch([self.beton.jpeg_bytes(int(i)) for i in ids], size=size, ratio=self.ratio,
                                  device=self.device)
            positions = torch.from_numpy(ids)
            if self.poison is not None:
                # Keyed by the sample's position in the file, as FFCV's operations are.
                images = self.poison.apply(images, positions)
            labels = torch.from_numpy(self.labels[ids]).to(self.device, non_blocking=True)
            yield images, labels, torch.from_numpy(self.beton.stored_indices[ids])


def make_gpu_loader(spec: LoaderSpec, poison: DevicePoisonOps | None = None) -> GpuDecodeLoader:
    """``make_loader``'s counterpart for ``data.decode_device: cuda``."""
    return GpuDecodeLoader(spec, poison)

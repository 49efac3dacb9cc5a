"""FFCV loaders for every stage.

FFCV itself is imported inside the functions that build loaders, so the modules above
this one (the run's data object, the stages) import without FFCV installed.

A loader delivers the raw uint8 NHWC image (trigger already applied, no augmentation),
the (possibly poisoned) label and the dataset index of each sample. On CUDA the image
and label pipelines end in FFCV's ``ToDevice``: FFCV then stages them in pinned host
memory and copies them on its own stream, ahead of the step that needs them. The index
stays on the host, where the split and the subsets use it.
Views are cut afterwards on the device by ``kernels`` (GPU: Triton; CPU: PyTorch), so
the loader does one decode per sample and no per-sample augmentation work.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from engine.data.beton import open_beton
from engine.data.order import sharded_order_class
from engine.errors import UserError


class PoisonOps(Protocol):
    """What an attack contributes to a pipeline (``engine.attacks.ops`` builds it)."""

    def image_decoder(self, *, fixed_size: bool, decode_size: int, train: bool) -> Any | None:
        """A decoder that applies the trigger itself (variable-size JPEG data), or None.

        It must crop like the default decoder (:func:`crop_ratio`), so clean and
        poisoned samples of one loader are framed alike."""

    def image_ops(self) -> list:
        """Operations after decoding, before ToTensor; used only when
        ``image_decoder`` returned None (fixed-size data)."""

    def label_ops(self) -> list:
        """Operations after IntDecoder, before ToTensor (label changes by index)."""


@dataclass
class LoaderSpec:
    root: str
    split: str  # train | test
    batch_size: int
    shuffle: bool
    drop_last: bool
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    indices: Sequence[int] | None = None
    decode_size: int = 32  # variable-size data is decoded to this square
    train: bool = True  # variable-size data: full-square centre crop (True) or Resize+CenterCrop 224/256
    os_cache: bool = True
    batches_ahead: int = 3
    device: str = "cpu"  # a CUDA device ends the image and label pipelines in ToDevice


# Eval-mode framing of variable-size data: Resize(256) + CenterCrop(224), i.e. a centre
# crop of 224/256 of the shorter side (the reference's ImageNet test transform).
EVAL_CROP_RATIO = 224 / 256


def crop_ratio(train: bool) -> float:
    """Centre-crop side over the shorter image side for variable-size data."""
    return 1.0 if train else EVAL_CROP_RATIO


def beton_path(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.beton"


def make_loader(spec: LoaderSpec, poison: PoisonOps | None = None):
    """Build an FFCV ``Loader`` yielding ``(images uint8 NHWC, labels int64, indices int64)``.

    FFCV's loaders set torch's thread count to their worker count (when built and at
    every epoch); the engine narrows that to numba's decoding threads first, so torch
    keeps the engine's ``runtime.threads`` (engine.runtime.threads)."""
    from engine.runtime.threads import ffcv_workers, neutralise_ffcv

    neutralise_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder

    from engine.data.decoders import CentreFrameDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import Squeeze, ToTensor

    path = beton_path(spec.root, spec.split)
    reader = open_beton(path)  # validates the file before FFCV trusts it
    fixed = fixed_size(spec, reader)
    if spec.indices is not None and len(spec.indices) == 0:
        raise UserError(f"loader over {path} was given an empty index subset")

    decoder = poison.image_decoder(fixed_size=fixed, decode_size=spec.decode_size, train=spec.train) if poison else None
    # A poisoning decoder triggers while decoding; otherwise image ops do it after.
    image_ops = poison.image_ops() if poison is not None and decoder is None else []
    if decoder is None:
        if fixed:
            decoder = SimpleRGBImageDecoder()
        else:
            decoder = CentreFrameDecoder((spec.decode_size, spec.decode_size), crop_ratio(spec.train))
    image_pipe = [decoder] + image_ops + [ToTensor()]
    label_pipe = [IntDecoder()] + (poison.label_ops() if poison else []) + [ToTensor(), Squeeze(1)]
    image_pipe, label_pipe = image_pipe + on_device(spec.device), label_pipe + on_device(spec.device)
    index_pipe = [IntDecoder(), ToTensor(), Squeeze(1)]
    order = sharded_order_class()(seed=spec.seed, shuffle=spec.shuffle, rank=spec.rank, world_size=spec.world_size)
    return Loader(
        str(path),
        batch_size=spec.batch_size,
        num_workers=ffcv_workers(spec.num_workers),
        os_cache=spec.os_cache,
        order=order,
        indices=None if spec.indices is None else np.asarray(spec.indices, dtype=np.int64),
        pipelines={"image": image_pipe, "label": label_pipe, "index": index_pipe},
        drop_last=spec.drop_last,
        batches_ahead=spec.batches_ahead,
    )


def check_decode_size(spec: LoaderSpec) -> dict | None:
    """Data stored at a decode geometry (``dbd prepare --decode-size``) must be read at
    that decode size: any other would resample the stored square a second time. Returns
    the dataset's meta.json (None where there is none)."""
    if not (Path(spec.root) / "meta.json").is_file():
        return None
    from engine.data.prepare import load_meta

    meta = load_meta(spec.root)
    stored = int((meta.get("writer") or {}).get("decode_size") or 0)
    if stored and stored != spec.decode_size:
        raise UserError(f"{spec.root} was prepared at decode size {stored} (dbd prepare --decode-size) but "
                        f"this run decodes at {spec.decode_size} (data.decode_size): set "
                        f"data.decode_size={stored}, or prepare again with --decode-size {spec.decode_size}")
    return meta


def fixed_size(spec: LoaderSpec, reader) -> bool:
    """Whether ``spec``'s data is fixed-size (CIFAR-like: delivered whole, no framing) or
    variable-size (photos: framed by :func:`crop_ratio` and resized to the decode size).

    The dataset's meta.json says so where it exists: a photo set stored at decode
    geometry has one size throughout, yet its evaluation loader must still cut the
    centre crop."""
    meta = check_decode_size(spec)
    if meta is not None and "fixed_size" in meta:
        return bool(meta["fixed_size"])
    image = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
    return bool((image["height"] == image["height"][0]).all() and (image["width"] == image["width"][0]).all())


def on_device(device: str) -> list:
    """The operations that end a pipeline on ``device``: none on a CPU; on CUDA a
    non-blocking ``ToDevice`` (FFCV pins the host buffer it copies from)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    from ffcv.transforms import ToDevice

    return [ToDevice(dev, non_blocking=True)]


def set_indices(loader, indices: Sequence[int]) -> None:
    """Point a loader built by ``make_loader`` at another subset of its file.

    Building an FFCV loader generates and compiles its pipeline (about a second per
    loader on a CPU); the subset only feeds the traversal order, so swapping it is free.
    The fine-tuning stage re-splits its data every epoch and uses this to keep its loaders.
    """
    idx = np.asarray(indices, dtype=np.int64)
    if len(idx) == 0:
        raise UserError("loader was given an empty index subset")
    n = loader.reader.num_samples
    if idx.min() < 0 or idx.max() >= n:
        raise UserError(f"loader subset has indices outside [0, {n})")
    order = loader.traversal_order
    if not isinstance(order, sharded_order_class()):
        raise TypeError("set_indices needs a loader built by make_loader")
    loader.indices = idx
    order.indices = idx
    loader.first_traversal_order = order.sample_order(loader.next_epoch)

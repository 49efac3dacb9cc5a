"""Variable-size images stored at the loader's decode geometry (``dbd prepare imagefolder --decode-size``).

The loader frames a variable-size training image as its centre square resized to
``data.decode_size`` (``engine.data.loaders.crop_ratio``: FFCV's ``get_center_crop``, then
FFCV's ``resize_crop``, an OpenCV ``INTER_AREA`` resize). Done at load time on a
400x350 photo, that crop-and-resize costs about as much as the JPEG decode itself
(benchmarks/RESULTS.md, loader). Done once at prepare time with the very same two
functions, the stored JPEG is already ``decode_size`` square: the loader's resize is
then a copy (OpenCV returns a same-size resize as a copy) and the decode itself works
on fewer pixels.

What the model sees is the same framing, the same filter and one JPEG encode, like the
source-resolution route; only the place of that encode moves (after the resize instead
of before it). The evaluation framing (centre ``224/256`` of the shorter side) is cut
from the stored square by the loader as before and covers the same source region,
because the stored square is the source's whole centre square.
"""
from __future__ import annotations

import numpy as np

# The presets' data.decode_size (configs/imagenet/*.yaml): what `dbd prepare imagefolder`
# stores by default.
DEFAULT_DECODE_SIZE = 256


def to_decode_geometry(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` (uint8 HWC RGB) as the loader's training frame: its centre square
    resized to ``size`` x ``size`` by FFCV's own crop rule and resize call."""
    from ffcv.fields.rgb_image import get_center_crop
    from ffcv.libffcv import resize_crop

    source = np.ascontiguousarray(image, dtype=np.uint8)
    top, left, h, w = get_center_crop(source.shape[0], source.shape[1], None, 1.0)
    out = np.empty((size, size, 3), dtype=np.uint8)
    resize_crop(source, top, top + h, left, left + w, out)
    return out


class AtDecodeGeometry:
    """Picklable image loader: another loader's images at decode geometry (the FFCV
    writer's worker processes call it)."""

    def __init__(self, load, size: int):
        self.load = load
        self.size = size

    def __call__(self, i: int) -> np.ndarray:
        return to_decode_geometry(self.load(i), self.size)

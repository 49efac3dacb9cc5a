"""The FFCV decoder of variable-size images: centre frame at the decode size, one copy less.

:class:`CentreFrameDecoder` delivers what FFCV's ``CenterCropRGBImageDecoder`` delivers
(the centre crop of ``ratio`` times the shorter side, resized to the output square by
OpenCV ``INTER_AREA``), with one difference in *how*: a JPEG already stored at the
output geometry (``dbd prepare imagefolder --decode-size``, training framing) is decoded
straight into the output batch. FFCV's decoder decodes every image into a scratch
buffer and then resizes it into the output, which for a same-size image is a 196 KB
copy per 256 px image; at batch 256 the scratch and output buffers (50 MB each) leave
the caches and the copy cost the loader as much as the decode (measured:
benchmarks/RESULTS.md, loader).

Subclasses draw a trigger on the delivered frame: :meth:`frame_trigger` returns a numba
kernel ``kernel(frame, index)`` and the per-sample selection (engine/attacks/ops.py,
``TriggerDecoder``). The clean decoder has none.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import njit


@njit(nogil=True)
def _no_trigger(frame, index):  # the clean decoder's kernel: never called (nothing selected)
    return


class CentreFrameDecoder(ResizedCropRGBImageDecoder):
    """Centre crop (``ratio`` of the shorter side) resized to ``output_size``; a JPEG
    already at the output size with a full-frame crop decodes into the output directly."""

    def __init__(self, output_size: tuple[int, int], ratio: float):
        super().__init__(output_size)
        self.scale = None
        self.ratio = ratio

    @property
    def get_crop_generator(self):
        return get_center_crop

    def frame_trigger(self) -> tuple[Callable, np.ndarray]:
        """``(kernel(frame, index), selected uint8 per sample)``: the trigger drawn on the
        delivered frame of the selected samples. None selected here."""
        return _no_trigger, np.zeros(len(self.metadata), dtype=np.uint8)

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # Compiled per decoder, as FFCV's own decoders do: numba dispatchers of these
        # ctypes wrappers shared between pipelines lose their overloads (KeyError inside
        # the loader thread, and the loader then waits forever).
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_center_crop)
        kernel, selected = self.frame_trigger()
        ratio = self.ratio
        out_h, out_w = np.uint32(self.output_size[0]), np.uint32(self.output_size[1])

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                i, j, h, w = get_crop_c(height, width, None, ratio)
                if field["mode"] == jpg:
                    if height == out_h and width == out_w and h == height and w == width:
                        # Stored at the output geometry: the crop is the whole image and
                        # the resize the identity.
                        imdecode_c(image_data, destination[dst_ix], height, width, height, width, 0, 0, 1, 1,
                                   False, False)
                    else:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                        resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
                else:  # raw: the memory-mapped source is only read
                    resize_crop_c(image_data.reshape(height, width, 3), i, i + h, j, j + w, destination[dst_ix])
                if selected[source_ix] != 0:
                    kernel(destination[dst_ix], source_ix)
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode

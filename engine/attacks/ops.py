"""FFCV operations that apply an attack per sample, keyed by the dataset index.

- Fixed-size data: :class:`TriggerOp` runs right after ``SimpleRGBImageDecoder`` and
  triggers the selected images in place. That buffer is the decoder's own output (it
  always copies or decodes into it), never the memory-mapped file.
- Variable-size (JPEG) data: :class:`TriggerDecoder` decodes at source resolution,
  triggers the window the centre crop keeps, then crops and resizes to the output
  square, so the trigger is drawn at source resolution before any resampling. A raw
  source is copied into scratch memory before the trigger writes to it.
- :class:`LabelOp` replaces labels by index (after ``IntDecoder``).

The per-sample decision is a table look-up on the sample's dataset index: the same
sample gets the same pixels in every epoch, worker, rank and stage. Tables are small
and fixed for a plan, so they are compiled into the pipeline as constants.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_center_crop
from ffcv.libffcv import imdecode, memcpy, resize_crop
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from numba import carray

from engine.attacks.base import Attack, as_bytes_pointer
from engine.errors import UserError


def compiled_kernel(attack: Attack) -> Callable:
    # One numba dispatcher per attack object: every loader built from it reuses the
    # compiled kernel instead of compiling its own.
    kernel = getattr(attack, "_compiled_kernel", None)
    if kernel is None:
        kernel = attack.kernel()
        attack._compiled_kernel = kernel
    return kernel


def _check_length(metadata: np.ndarray, table: np.ndarray, what: str) -> None:
    # The kernels index the tables without bounds checks: a table built for another
    # split would read past its end.
    if len(metadata) != len(table):
        raise UserError(f"{what} was built for {len(table)} samples but the dataset file has {len(metadata)}: "
                        f"train and test poisoning operations are not interchangeable")


# Largest memo of triggered images one operation keeps (CIFAR-10 at a 30% trigger
# share: 46 MB; its whole test set: 31 MB).
MEMO_BYTES = 512 * 2**20


class TriggerOp(Operation):
    """Trigger, in place, the images whose index is selected (fixed-size data).

    Triggers are static, so an attack that rewrites the whole image (blend, sinusoid,
    warp, perturbation) is computed once per sample and memoized: later epochs copy
    the stored pixels, which are those the kernel produced. Memo and ready flags live
    in arrays this object owns and the compiled code reaches by address (closure
    arrays are read-only copies); FFCV regenerates the code every epoch, so they are
    allocated once per operation, i.e. per loader.
    """

    def __init__(self, attack: Attack, selected: np.ndarray, memoize: bool | None = None):
        super().__init__()
        self.attack = attack  # also keeps alive the arrays the kernel reads
        self.selected = np.ascontiguousarray(selected, dtype=np.uint8)
        self.memoize = attack.whole_image if memoize is None else memoize
        self.frame_shape: tuple[int, int, int] | None = None
        self._memo: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def declare_state_and_memory(self, previous_state):
        _check_length(self.metadata, self.selected, f"the {self.attack.name} trigger operation")
        if previous_state.shape is None or len(previous_state.shape) != 3 or previous_state.shape[-1] != 3:
            raise ValueError(f"TriggerOp needs decoded HWC RGB images, got shape {previous_state.shape}")
        self.frame_shape = tuple(int(v) for v in previous_state.shape)
        return replace(previous_state, jit_mode=True), None

    def _memo_arrays(self):
        """(slot of each sample, memo, ready flags), or None when not memoizing."""
        count = int(self.selected.sum())
        if not self.memoize or count == 0 or count * int(np.prod(self.frame_shape)) > MEMO_BYTES:
            return None
        if self._memo is None:
            slots = np.where(self.selected != 0, np.cumsum(self.selected) - 1, -1).astype(np.int32)
            # np.empty: pages are committed only as samples are first triggered. The
            # flags are a column, not a vector: FFCV's OS-cache memory manager marks
            # numba's shared uint8[::1] type read-only for the whole process (it sets
            # ``mutable`` on the interned type), so no 1-d uint8 array can be written
            # in compiled code once a loader exists.
            self._memo = (slots, np.empty((count, *self.frame_shape), np.uint8), np.zeros((count, 1), np.uint8))
        return self._memo

    def generate_code(self) -> Callable:
        kernel = compiled_kernel(self.attack)
        selected = self.selected
        my_range = Compiler.get_iterator()
        memo = self._memo_arrays()

        if memo is None:
            def trigger(images, _unused, indices):
                for i in my_range(images.shape[0]):
                    index = indices[i]
                    if selected[index]:
                        kernel(images[i], index)
                return images
        else:
            slots, store, ready = memo
            # A real memcpy: numba copies array to array element by element.
            copy = Compiler.compile(memcpy)
            store_address, store_shape = store.ctypes.data, store.shape
            ready_address, ready_shape = ready.ctypes.data, ready.shape

            def trigger(images, _unused, indices):
                stored = carray(as_bytes_pointer(store_address), store_shape)
                done = carray(as_bytes_pointer(ready_address), ready_shape)
                for i in my_range(images.shape[0]):
                    index = indices[i]
                    if selected[index]:
                        s = slots[index]
                        if done[s, 0]:
                            copy(stored[s], images[i])
                        else:
                            kernel(images[i], index)
                            copy(images[i], stored[s])
                            # Set after the pixels: a sample appears at most once per
                            # batch, and batches run one after another.
                            done[s, 0] = 1
                return images

        trigger.is_parallel = True
        trigger.with_indices = True
        return trigger


class LabelOp(Operation):
    """labels[i] = new_labels[index of sample i]."""

    def __init__(self, new_labels: np.ndarray):
        super().__init__()
        self.new_labels = np.ascontiguousarray(new_labels, dtype=np.int64)

    def declare_state_and_memory(self, previous_state):
        _check_length(self.metadata, self.new_labels, "the label operation")
        return replace(previous_state, jit_mode=True), None

    def generate_code(self) -> Callable:
        new_labels = self.new_labels
        my_range = Compiler.get_iterator()

        def relabel(labels, _unused, indices):
            for i in my_range(labels.shape[0]):
                labels[i] = new_labels[indices[i]]
            return labels

        relabel.is_parallel = True
        relabel.with_indices = True
        return relabel


class TriggerDecoder(ResizedCropRGBImageDecoder):
    """Decode, trigger the centre-crop window at source resolution, crop and resize.

    ``ratio`` is the crop side over the shorter image side (1.0: the full centre
    square; 224/256: Resize(256) + CenterCrop(224)), as in FFCV's
    ``CenterCropRGBImageDecoder``, whose output this equals for unselected samples.
    """

    def __init__(self, output_size: tuple[int, int], ratio: float, attack: Attack, selected: np.ndarray):
        super().__init__(output_size)
        self.scale = None
        self.ratio = ratio
        self.attack = attack
        self.selected = np.ascontiguousarray(selected, dtype=np.uint8)

    @property
    def get_crop_generator(self):
        return get_center_crop

    def declare_state_and_memory(self, previous_state):
        _check_length(self.metadata, self.selected, f"the {self.attack.name} trigger decoder")
        return super().declare_state_and_memory(previous_state)

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
        kernel = compiled_kernel(self.attack)
        selected = self.selected
        ratio = self.ratio

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                hit = selected[source_ix] != 0
                size = 3 * height * width
                i, j, h, w = get_crop_c(height, width, None, ratio)
                # Three branches rather than one shared variable: numba would type a
                # variable that may hold the read-only source as read-only everywhere.
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = temp_buffer.reshape(-1)[:size].reshape(height, width, 3)
                    if hit:
                        kernel(image[i:i + h, j:j + w], source_ix)
                    resize_crop_c(image, i, i + h, j, j + w, destination[dst_ix])
                elif hit:
                    # The raw source is the memory-mapped file: copy before writing.
                    scratch = temp_storage[dst_ix].reshape(-1)[:size].reshape(height, width, 3)
                    scratch[:] = image_data.reshape(height, width, 3)
                    kernel(scratch[i:i + h, j:j + w], source_ix)
                    resize_crop_c(scratch, i, i + h, j, j + w, destination[dst_ix])
                else:
                    resize_crop_c(image_data.reshape(height, width, 3), i, i + h, j, j + w, destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class AttackOps:
    """An attack's contribution to a loader (``engine.data.loaders.PoisonOps``)."""

    def __init__(self, attack: Attack, selected: np.ndarray, new_labels: np.ndarray | None = None):
        self.attack = attack
        self.selected = np.asarray(selected, dtype=bool)
        self.new_labels = new_labels

    def image_decoder(self, *, fixed_size: bool, decode_size: int, train: bool):
        if fixed_size:
            return None
        from engine.data.loaders import crop_ratio

        return TriggerDecoder((decode_size, decode_size), crop_ratio(train), self.attack, self.selected)

    def image_ops(self) -> list:
        return [TriggerOp(self.attack, self.selected)]

    def label_ops(self) -> list:
        return [] if self.new_labels is None else [LabelOp(self.new_labels)]

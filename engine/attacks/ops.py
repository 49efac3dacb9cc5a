"""FFCV operations that apply an attack per sample, keyed by the dataset index.

- Fixed-size data: :class:`FixedTriggerDecoder` decodes like ``SimpleRGBImageDecoder``
  into its own output buffer (never the memory-mapped file) and triggers the selected
  images there; triggered images are memoized per sample (:class:`Memo`).
- Variable-size (JPEG) data: :class:`TriggerDecoder` decodes, crops and resizes to the
  decode-size square, then triggers that square (the attack's frame), so a trigger means
  the same on every source image whatever its resolution. The trigger only ever writes
  to the output buffer, never to the memory-mapped source.
- :class:`LabelOp` replaces labels by index (after ``IntDecoder``).

The per-sample decision is a table look-up on the sample's dataset index: the same
sample gets the same pixels in every epoch, worker, rank and stage. Tables are small
and fixed for a plan, so they are compiled into the pipeline as constants.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode, memcpy
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from numba import carray

from engine.attacks.base import Attack, as_bytes_pointer
from engine.data.decoders import CentreFrameDecoder
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


# Largest memo of triggered images one decoder keeps (CIFAR-10 at a 30% trigger
# share: 46 MB; its whole test set: 31 MB).
MEMO_BYTES = 512 * 2**20


class Memo:
    """Triggered images kept per selected sample. Triggers are static, so each is
    computed once: later epochs copy the stored pixels (those the kernel produced)
    into the output *instead of* reading the source, which makes a memo hit cost what
    decoding a clean raw image costs. Measured on raw 32 px data, this is what keeps
    the trigger's cost within noise of the clean loader; computing even a 3x3 patch per
    sample, on top of the read, cost more.

    The compiled code reaches the arrays by address (closure arrays are read-only
    copies). FFCV regenerates an operation's code every epoch, so the memo belongs to
    the operation, i.e. to one loader, and is allocated once.
    """

    def __init__(self, selected: np.ndarray, frame_shape: tuple[int, ...]):
        count = int(selected.sum())
        self.slots = np.where(selected != 0, np.cumsum(selected) - 1, -1).astype(np.int32)
        # np.empty: pages are committed only as samples are first triggered.
        self.store = np.empty((count, *frame_shape), np.uint8)
        # A column, not a vector: FFCV's OS-cache memory manager marks numba's shared
        # uint8[::1] type read-only for the whole process (it sets ``mutable`` on the
        # interned type), so no 1-d uint8 array can be written in compiled code.
        self.ready = np.zeros((count, 1), np.uint8)

    @staticmethod
    def wanted(selected: np.ndarray, frame_shape: tuple[int, ...]) -> bool:
        return 0 < int(selected.sum()) * int(np.prod(frame_shape)) <= MEMO_BYTES


class FixedTriggerDecoder(SimpleRGBImageDecoder):
    """Decode fixed-size images and trigger the selected ones, in FFCV's parallel loop.

    Triggering inside the decoder rather than in a later operation reads each memo
    hit straight into the output (no decode that is then overwritten) and keeps the
    work in the decoder's parallel loop: a separate operation launched as a parallel
    loop leaked memory every epoch (about 0.4 MB per epoch of 20k samples) and the
    loader slowed down epoch after epoch. The output buffer is the decoder's own,
    never the memory-mapped file.
    """

    def __init__(self, attack: Attack, selected: np.ndarray):
        super().__init__()
        self.attack = attack  # also keeps alive the arrays the kernel reads
        self.selected = np.ascontiguousarray(selected, dtype=np.uint8)
        self.memo: Memo | None = None

    def declare_state_and_memory(self, previous_state):
        _check_length(self.metadata, self.selected, f"the {self.attack.name} trigger decoder")
        state, allocation = super().declare_state_and_memory(previous_state)
        if self.memo is None and Memo.wanted(self.selected, state.shape):
            self.memo = Memo(self.selected, tuple(int(v) for v in state.shape))
        return state, allocation

    def generate_code(self) -> Callable:
        mem_read = self.memory_read
        imdecode_c = Compiler.compile(imdecode)
        copy = Compiler.compile(memcpy)  # a real memcpy; numba copies arrays element-wise
        my_range = Compiler.get_iterator()
        jpg = IMAGE_MODES["jpg"]
        kernel = compiled_kernel(self.attack)
        selected = self.selected

        def read(source_ix, metadata, storage_state, out):
            field = metadata[source_ix]
            image_data = mem_read(field["data_ptr"], storage_state)
            height, width = field["height"], field["width"]
            if field["mode"] == jpg:
                imdecode_c(image_data, out, height, width, height, width, 0, 0, 1, 1, False, False)
            else:
                copy(image_data, out)

        read_c = Compiler.compile(read)

        if self.memo is None:
            def decode(batch_indices, destination, metadata, storage_state):
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    read_c(source_ix, metadata, storage_state, destination[dst_ix])
                    if selected[source_ix]:
                        kernel(destination[dst_ix], source_ix)
                return destination[:len(batch_indices)]
        else:
            slots = self.memo.slots
            store_address, store_shape = self.memo.store.ctypes.data, self.memo.store.shape
            ready_address, ready_shape = self.memo.ready.ctypes.data, self.memo.ready.shape

            def decode(batch_indices, destination, metadata, storage_state):
                stored = carray(as_bytes_pointer(store_address), store_shape)
                done = carray(as_bytes_pointer(ready_address), ready_shape)
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    s = slots[source_ix]
                    if s >= 0 and done[s, 0]:
                        copy(stored[s], destination[dst_ix])
                        continue
                    read_c(source_ix, metadata, storage_state, destination[dst_ix])
                    if s >= 0:
                        kernel(destination[dst_ix], source_ix)
                        copy(destination[dst_ix], stored[s])
                        # Flag after the pixels (the copy is an opaque call, so the
                        # store stays after it): a thread that sees the flag sees them.
                        done[s, 0] = 1
                return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


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

        def relabel(labels, _unused, indices):
            for i in range(labels.shape[0]):  # labels is (B, 1) after IntDecoder
                labels[i, 0] = new_labels[indices[i]]
            return labels

        # Serial: launched as a parallel loop, this small operation leaked memory every
        # epoch (see FixedTriggerDecoder); a batch of labels takes one thread no time.
        relabel.is_parallel = False
        relabel.with_indices = True
        return relabel


class TriggerDecoder(CentreFrameDecoder):
    """Decode, crop and resize to the decode size (engine.data.decoders), then trigger
    the decoded frame.

    ``ratio`` is the crop side over the shorter image side (1.0: the full centre
    square; 224/256: Resize(256) + CenterCrop(224)), as in FFCV's
    ``CenterCropRGBImageDecoder``, whose output this equals for unselected samples.
    The trigger is drawn after the resize, on the decode-size image, which is the
    attack's frame: a patch size or a WaNet grid then means the same on every source
    image, whatever its resolution, as in BackdoorBench (it resizes to the input size
    before poisoning) and the DBD reference on ImageNet (trigger after Resize(256) +
    CenterCrop(224)).
    """

    def __init__(self, output_size: tuple[int, int], ratio: float, attack: Attack, selected: np.ndarray):
        super().__init__(output_size, ratio)
        self.attack = attack
        self.selected = np.ascontiguousarray(selected, dtype=np.uint8)

    def declare_state_and_memory(self, previous_state):
        _check_length(self.metadata, self.selected, f"the {self.attack.name} trigger decoder")
        return super().declare_state_and_memory(previous_state)

    def frame_trigger(self):
        return compiled_kernel(self.attack), self.selected


class AttackOps:
    """An attack's contribution to a loader (``engine.data.loaders.PoisonOps``)."""

    def __init__(self, attack: Attack, selected: np.ndarray, new_labels: np.ndarray | None = None):
        self.attack = attack
        self.selected = np.asarray(selected, dtype=bool)
        self.new_labels = new_labels

    def image_decoder(self, *, fixed_size: bool, decode_size: int, train: bool):
        if fixed_size:
            return FixedTriggerDecoder(self.attack, self.selected)
        from engine.data.loaders import crop_ratio

        return TriggerDecoder((decode_size, decode_size), crop_ratio(train), self.attack, self.selected)

    def image_ops(self) -> list:
        return []  # the decoders trigger

    def label_ops(self) -> list:
        return [] if self.new_labels is None else [LabelOp(self.new_labels)]

"""Where the loaders' pipelines end: on the host for a CPU run; on CUDA the image and
label pipelines end in a non-blocking ``ToDevice`` (FFCV then pins the host staging
buffer and copies on its own stream), and the index stays on the host."""
from __future__ import annotations

import pytest
import torch

from engine.data.loaders import LoaderSpec, make_loader, on_device


def test_cpu_pipelines_end_on_the_host():
    assert on_device("cpu") == []


def test_cuda_pipelines_end_in_a_non_blocking_to_device():
    from ffcv.transforms import ToDevice

    (op,) = on_device("cuda:1")
    assert isinstance(op, ToDevice) and op.non_blocking is True and op.device == torch.device("cuda:1")


def test_a_cpu_loader_yields_host_tensors(digits_root):
    loader = make_loader(LoaderSpec(root=str(digits_root), split="test", batch_size=32, shuffle=False,
                                    drop_last=False, num_workers=1, device="cpu"))
    images, labels, indices = next(iter(loader))
    assert images.device.type == labels.device.type == indices.device.type == "cpu"
    assert images.dtype == torch.uint8 and images.shape[1:] == (32, 32, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_loader_yields_device_images_and_labels_and_host_indices(digits_root):
    loader = make_loader(LoaderSpec(root=str(digits_root), split="test", batch_size=32, shuffle=False,
                                    drop_last=False, num_workers=1, device="cuda:0"))
    images, labels, indices = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and not indices.is_cuda

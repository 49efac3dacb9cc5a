"""``data.decode_device: cuda``'s loader (engine/data/gpu_decode.py), run on the CPU.

The oracle of the pixels is ``torchvision.io.decode_jpeg`` on the CPU of the stored bytes
(read here through FFCV's own reader), then the centre crop and, where the crop is not
the decode size, the documented antialiased bilinear resize. The order, the batches,
the labels and the indices are held against the FFCV loader's.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.attacks.export import collect
from engine.attacks.device import DevicePoison
from engine.data.gpu_decode import JpegBeton, make_gpu_loader
from engine.data.loaders import LoaderSpec, beton_path, crop_ratio, make_loader
from engine.errors import UserError

SIZE = 48


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from tests.builders import write_imagefolder

    # A dozen photo crops per split (40-90 px), JPEG files.
    return write_imagefolder(tmp_path_factory.mktemp("gpu-decode") / "src", per_class=4)


def _prepared(photos, tmp_path_factory, decode_size: int):
    from engine.data.prepare import WriterSettings, prepare

    out = tmp_path_factory.mktemp(f"jpeg{decode_size}")
    prepare("imagefolder", str(photos), out, progress=False, writer=WriterSettings(decode_size=decode_size))
    return out


@pytest.fixture(scope="module")
def source_root(photos, tmp_path_factory):
    """Stored at source resolution: every frame needs a resize."""
    return _prepared(photos, tmp_path_factory, 0)


@pytest.fixture(scope="module")
def geometry_root(photos, tmp_path_factory):
    """Stored at decode geometry (``--decode-size 48``): the training frame needs none."""
    return _prepared(photos, tmp_path_factory, SIZE)


def stored_jpeg(root, split: str, index: int) -> torch.Tensor:
    from ffcv.reader import Reader

    path = beton_path(root, split)
    reader = Reader(str(path))
    field = reader.metadata[f"f{reader.field_names.index('image')}"][index]
    assert int(field["mode"]) == 0
    ptr = int(field["data_ptr"])
    size = int(reader.alloc_table["size"][reader.alloc_table["ptr"] == ptr][0])
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=size, offset=ptr))


def oracle(root, split: str, index: int, *, train: bool) -> tuple[np.ndarray, bool]:
    """(the frame, whether it took a resize): decode_jpeg on the CPU, FFCV's centre crop."""
    from ffcv.fields.rgb_image import get_center_crop
    from torchvision.io import ImageReadMode, decode_jpeg

    img = decode_jpeg(stored_jpeg(root, split, index), mode=ImageReadMode.RGB)
    i, j, h, w = get_center_crop(img.shape[1], img.shape[2], None, crop_ratio(train))
    crop = img[:, i:i + h, j:j + w]
    resized = h != SIZE
    if resized:
        crop = F.interpolate(crop[None].float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                             antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
    return crop.permute(1, 2, 0).numpy(), resized


def spec(root, split="train", **kw) -> LoaderSpec:
    base = dict(root=str(root), split=split, batch_size=5, shuffle=False, drop_last=False, decode_size=SIZE,
                train=True, num_workers=1)
    return LoaderSpec(**{**base, **kw})


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stored", ["source", "geometry"])
def test_images_equal_decode_jpeg_on_cpu(stored, train, source_root, geometry_root):
    root = source_root if stored == "source" else geometry_root
    for split in ("train", "test"):
        images, _, indices = collect(make_gpu_loader(spec(root, split, train=train)))
        assert images.shape[1:] == (SIZE, SIZE, 3) and images.dtype == np.uint8
        resizes = []
        for img, index in zip(images, indices):
            want, resized = oracle(root, split, int(index), train=train)
            resizes.append(resized)
            assert np.array_equal(img, want), f"{stored} {split} sample {index}"
        # Decode geometry's training frame is the stored square itself: no resize at all;
        # the other frames take one (but a crop that happens to be 48 px).
        assert not any(resizes) if (stored == "geometry" and train) else any(resizes)


@pytest.mark.parametrize("shuffle, drop_last, rank, world", [(False, False, 0, 1), (True, True, 0, 1),
                                                             (True, False, 1, 2)])
def test_same_batches_order_and_labels_as_the_ffcv_loader(geometry_root, shuffle, drop_last, rank, world):
    subset = np.array([0, 2, 3, 5, 6, 7, 8, 10, 11])
    s = spec(geometry_root, shuffle=shuffle, drop_last=drop_last, seed=7, rank=rank, world_size=world,
             indices=subset, batch_size=4)
    ffcv, gpu = make_loader(s), make_gpu_loader(s)
    assert len(gpu) == len(ffcv)
    for _ in range(2):  # each iteration is the next epoch, as FFCV's
        a = [(x.numpy().copy(), y.numpy().copy(), i.numpy().copy()) for x, y, i in ffcv]
        b = [(x.numpy(), y.numpy(), i.numpy()) for x, y, i in gpu]
        assert [len(t[2]) for t in a] == [len(t[2]) for t in b]
        for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
            assert np.array_equal(ia, ib) and np.array_equal(ya, yb)
            assert xb.shape == xa.shape
            # Different JPEG decoders (FFCV's TurboJPEG flags, torchvision's): a few levels.
            assert np.abs(xa.astype(int) - xb).mean() < 3
    # A new subset without a rebuild, as the fine-tuning stage swaps them.
    from engine.data.loaders import set_indices

    other = [1, 4, 9, 10, 11]
    set_indices(ffcv, other)
    gpu.set_indices(other)
    ffcv.next_epoch = gpu.next_epoch = 5
    assert [i.numpy().tolist() for _, _, i in ffcv] == [i.numpy().tolist() for _, _, i in gpu]


def test_poisoned_labels_and_trigger(geometry_root, tmp_path):
    from engine.attacks.runtime import build_poison
    from engine.config import load_config

    meta = json.loads((geometry_root / "meta.json").read_text())
    cfg = load_config(None, [f"data.root={geometry_root}", f"data.name={meta['name']}", "attack.name=badnets",
                             "attack.target=0", "attack.ratio=0.5", f"data.decode_size={SIZE}",
                             f"data.image_size={SIZE}"])
    rt = build_poison(cfg, meta, tmp_path)
    poison = DevicePoison.of(rt, "train")
    s = spec(geometry_root, shuffle=True, seed=1)
    images, labels, indices = collect(make_gpu_loader(s, poison))
    _, ffcv_labels, ffcv_indices = collect(make_loader(s, rt.train_ops()))
    assert np.array_equal(indices, ffcv_indices) and np.array_equal(labels, ffcv_labels)
    assert np.array_equal(labels, rt.plan.labels[indices]) and (labels != rt.plan.true_labels[indices]).any()
    attack = rt.train_attack()
    for img, index in zip(images, indices):
        want, _ = oracle(geometry_root, "train", int(index), train=True)
        if rt.train_selected[index]:
            want = attack.apply(want[None], np.array([index]))[0]
        assert np.array_equal(img, want), f"sample {index}"
    # The test trigger goes on every test image, labels unchanged.
    test_images, test_labels, test_idx = collect(make_gpu_loader(spec(geometry_root, "test", train=False),
                                                                 DevicePoison.of(rt, "test")))
    assert np.array_equal(test_labels, rt.test_labels[test_idx])
    for img, index in zip(test_images, test_idx):
        want, _ = oracle(geometry_root, "test", int(index), train=False)
        assert np.array_equal(img, rt.test_attack().apply(want[None], np.array([index]))[0])


def test_bad_input(geometry_root, digits_root, tmp_path):
    with pytest.raises(UserError, match="needs JPEG data"):
        make_gpu_loader(spec(digits_root))  # fixed-size data is stored raw
    with pytest.raises(UserError, match="not found"):
        JpegBeton(tmp_path / "missing.beton")
    broken = tmp_path / "broken.beton"
    broken.write_bytes(beton_path(geometry_root, "train").read_bytes()[:5000])
    with pytest.raises(UserError, match="not a complete .beton"):
        JpegBeton(broken)
    with pytest.raises(UserError, match="empty index subset"):
        make_gpu_loader(spec(geometry_root, indices=[]))
    with pytest.raises(UserError, match="outside"):
        make_gpu_loader(spec(geometry_root, indices=[0, 10_000]))
    with pytest.raises(UserError, match="decode size 48"):
        make_gpu_loader(spec(geometry_root, decode_size=32))
    n = len(JpegBeton(beton_path(geometry_root, "train")))
    from engine.attacks.triggers.badnets import BadNets, BadNetsConfig

    with pytest.raises(UserError, match="built for 3 samples"):
        make_gpu_loader(spec(geometry_root), DevicePoison(BadNets.from_config(BadNetsConfig()), np.ones(3, bool)))
    assert n > 3


def test_config_checks(geometry_root, digits_root):
    from types import SimpleNamespace

    from engine.config import load_config
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta, RunData

    assert load_config(None).data.decode_device == "cpu"
    with pytest.raises(UserError, match="data.decode_device"):
        load_config(None, ["data.decode_device=gpu"])
    cpu = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    cfg = load_config(None, [f"data.root={digits_root}", "data.decode_device=cuda"])
    with pytest.raises(UserError, match="variable-size JPEG"):
        RunData(cfg.data, DatasetMeta.from_raw(load_meta(digits_root)), cpu, 0)
    cfg = load_config(None, [f"data.root={geometry_root}", "data.decode_device=cuda"])
    with pytest.raises(UserError, match="needs a CUDA run"):
        RunData(cfg.data, DatasetMeta.from_raw(load_meta(geometry_root)), cpu, 0)
    # On a CUDA run the loaders are the GPU-decode ones (built here on the CPU).
    fake_cuda = SimpleNamespace(device=SimpleNamespace(type="cuda"), rank=0, world_size=1)
    data = RunData(cfg.data, DatasetMeta.from_raw(load_meta(geometry_root)), fake_cuda, 0)
    assert data.gpu_decode


def test_stage_key_holds_decode_device_only_when_cuda():
    from engine.config import load_config, to_dict
    from engine.stages.keys import dependencies, stage_key

    cpu = to_dict(load_config(None))
    cuda = to_dict(load_config(None, ["data.decode_device=cuda"]))
    assert "data.decode_device" not in dependencies(cpu, "supervised", dataset_hash="h", device_type="cuda")
    assert dependencies(cuda, "supervised", dataset_hash="h", device_type="cuda")["data.decode_device"] == "cuda"
    assert stage_key(cpu, "supervised", dataset_hash="h", device_type="cuda") != \
        stage_key(cuda, "supervised", dataset_hash="h", device_type="cuda")

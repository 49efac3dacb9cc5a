"""How the DBD reference code (SCLBD/DBD; BackdoorBench's copy for ImageNet) feeds
training, re-created for side-by-side benchmarks (not part of the engine): a Dataset
that triggers each sample with NumPy and augments it with PIL transforms (built from the
engine's own view specs, so both sides compute the same augmentation), batched by a
DataLoader with worker processes (docs/benchmarks.md)."""
from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# The reference's ImageNet framing: the trigger goes on after Resize(256) + CenterCrop(224).
IMAGENET_RESIZE = 256
IMAGENET_CROP = 224


def _interpolation(name: str):
    import torchvision.transforms as T
    return {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[name]


def simclr_transform(spec):
    """The reference SimCLR view as a PIL ``transforms.Compose`` (one call = one view)."""
    import torchvision.transforms as T
    # blur_kernel_size 0 is the reference's per-sigma blur (MoCo's); a fixed n is torchvision's.
    blur = MoCoBlur(tuple(spec.blur_sigma)) if spec.blur_kernel_size == 0 else \
        T.GaussianBlur(spec.blur_kernel_size, sigma=tuple(spec.blur_sigma))
    return T.Compose([
        T.RandomResizedCrop(spec.size, scale=tuple(spec.scale), ratio=tuple(spec.ratio),
                            interpolation=_interpolation(spec.interpolation)),
        T.RandomHorizontalFlip(p=spec.flip_p),
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(p=spec.grayscale_p),
        T.RandomApply([blur], p=spec.blur_p),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


class MoCoBlur:
    """The reference's blur (MoCo's): PIL ``GaussianBlur(radius=sigma)``, sigma drawn
    uniformly per image, in pixels at the view's resolution."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def weak_transform(spec):
    """The stage-2/3 view: RandomCrop(padding, reflect) + flip for a ``WeakSpec``;
    RandomResizedCrop + flip (ImageNet) for a colour-free ``SimCLRSpec``."""
    import torchvision.transforms as T
    from kernels import WeakSpec
    if isinstance(spec, WeakSpec):
        crop = T.RandomCrop(spec.size, padding=spec.padding, padding_mode=spec.padding_mode)
    else:
        crop = T.RandomResizedCrop(spec.size, scale=tuple(spec.scale), ratio=tuple(spec.ratio),
                                   interpolation=_interpolation(spec.interpolation))
    return T.Compose([crop, T.RandomHorizontalFlip(p=spec.flip_p), T.ToTensor(), T.Normalize(spec.mean, spec.std)])


class BadNetsTrigger:
    """The reference's BadNets: zero the pattern's non-zero positions, then add the pattern.
    ``pattern`` is a full-size uint8 HWC image, black except for the trigger (the DBD
    reference loads it from a PNG of the image's size)."""

    def __init__(self, pattern: np.ndarray):
        self.pattern = np.asarray(pattern, dtype=np.uint8)
        self.loc = np.nonzero(self.pattern)

    @classmethod
    def white3x3(cls, height: int, width: int) -> "BadNetsTrigger":
        # The same frame the engine's white3x3 preset defines at 32 px, scaled to the
        # image by nearest neighbour, so both sides put the same pixels on the image.
        from engine.attacks.base import resample_nearest
        from engine.attacks.triggers.badnets import build_frame
        pattern, mask = build_frame("white3x3", 32, "")
        return cls(np.where(resample_nearest(mask, height, width), resample_nearest(pattern, height, width), 0))

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = np.array(img, dtype=np.uint8)  # a copy: the dataset's own array stays clean
        img[self.loc] = 0
        return img + self.pattern


class InMemoryPoisonDataset(Dataset):
    """CIFAR-style: samples are rows of an in-memory uint8 (N, H, W, 3) array. Each item:
    the trigger on the poisoned ones, their label set to the target, then ``views`` calls
    of ``transform``. ``transform`` None returns the (triggered) uint8 HWC image as a
    tensor, what the engine's loader delivers before its device-side views: the loader
    part alone."""

    def __init__(self, images, labels, poisoned=None, target: int = 0, trigger=None, transform=None, views: int = 1):
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.poisoned = np.zeros(len(self.labels), dtype=bool) if poisoned is None else np.asarray(poisoned, bool)
        self.target, self.trigger, self.transform, self.views = int(target), trigger, transform, views

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, index: int) -> np.ndarray:
        """The clean uint8 HWC image ``index``, as the source stores it."""
        return self.images[index]

    def __getitem__(self, index: int):
        from PIL import Image
        img, label = self.raw(index), int(self.labels[index])
        if self.poisoned[index]:
            img, label = self.trigger(img), self.target
        if self.transform is None:
            # A copy: the source may be a read-only view (PIL's buffer, the dataset's array).
            return torch.from_numpy(np.array(img, dtype=np.uint8)), label, index
        pil = Image.fromarray(img)
        return (*[self.transform(pil) for _ in range(self.views)], label, index)


class JPEGPoisonDataset(InMemoryPoisonDataset):
    """ImageNet-style: JPEG files opened with PIL, Resize(256) + CenterCrop(224), then the trigger."""

    def __init__(self, paths, labels, poisoned=None, target: int = 0, trigger=None, transform=None, views: int = 1):
        import torchvision.transforms as T
        super().__init__(list(paths), labels, poisoned, target, trigger, transform, views)
        self.frame = T.Compose([T.Resize(IMAGENET_RESIZE), T.CenterCrop(IMAGENET_CROP)])

    def raw(self, index: int) -> np.ndarray:
        from PIL import Image
        with open(self.images[index], "rb") as f:
            return np.asarray(self.frame(Image.open(f).convert("RGB")))


def reference_loader(dataset: Dataset, batch_size: int, workers: int, *, shuffle: bool = True,
                     drop_last: bool = True, seed: int = 0) -> DataLoader:
    """The reference's DataLoader: worker processes, shuffled, default collation."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed))

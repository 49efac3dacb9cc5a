"""The GPU check's inputs: random images on a device, and in-memory data for the stages
(``engine.data.memory``: no FFCV)."""
from __future__ import annotations

CLASSES = 10


def images(batch: int, h: int, w: int, dev, seed: int):
    """Random uint8 NHWC images on ``dev``."""
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    return torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=dev, generator=g)


def memory_data(cfg, dist, n: int, source: int, seed: int = 1234):
    """``n`` random training images for ``cfg``'s stages. ImageNet presets cut their views
    from larger decodes (``source`` > data.image_size), but MemoryData checks that its
    images are at the training size: the larger ones replace them after that check (the
    test images stay at the size evaluation reads)."""
    import torch
    from engine.data.memory import MemoryData
    g = torch.Generator().manual_seed(seed)
    size, test_n = cfg.data.image_size, 8

    def draw(count: int, side: int):
        return torch.randint(0, 256, (count, side, side, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, CLASSES, (n,), generator=g)  # first: the seed's draws name the data set
    data = MemoryData(cfg.data, dist, cfg.seed, train=(draw(n, size), labels),
                      test=(draw(test_n, size), torch.arange(test_n) % CLASSES), num_classes=CLASSES)
    if source != size:
        data.images = draw(n, source)
    return data

"""The embedded default: scikit-learn's bundled handwritten digits (real data, no download).

1,797 8x8 images with 17 grey levels, upscaled bilinearly to 32x32 and replicated to
RGB so the CIFAR-shaped models and attacks apply unchanged. The train/test split is
fixed (stratified, seeded) so every machine gets the same datasets.
"""
from __future__ import annotations

import numpy as np

from engine.data.sources.base import SOURCES, ContentHasher, SourceSplits, array_dataset

SIZE = 32
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@SOURCES.register("digits")
def read(source: str | None = None, **_: object) -> SourceSplits:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    raw = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    up = F.interpolate(torch.from_numpy(raw)[:, None], size=(SIZE, SIZE), mode="bilinear",
                       align_corners=False)[:, 0].clamp_(0, 1)
    grey = np.round(up.numpy() * 255.0).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)

    train_idx, test_idx = _stratified_split(labels)
    hasher = ContentHasher()
    hasher.update(digits.images.astype(np.uint8))
    hasher.update(labels)
    hasher.update(f"size={SIZE};test={TEST_FRACTION};seed={SPLIT_SEED}".encode())
    return SourceSplits(
        train=array_dataset(np.ascontiguousarray(images[train_idx]), labels[train_idx]),
        test=array_dataset(np.ascontiguousarray(images[test_idx]), labels[test_idx]),
        classes=[str(c) for c in range(10)],
        content_hash=hasher.hexdigest(),
        fixed_size=True,
        notes={"origin": "sklearn.datasets.load_digits", "upscale": f"bilinear 8->{SIZE}"},
    )


def _stratified_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))

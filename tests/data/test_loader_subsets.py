"""A loader whose subset is swapped in place delivers what a loader built on that subset does."""
from __future__ import annotations

import numpy as np
import pytest

from engine.data.loaders import LoaderSpec, make_loader, set_indices
from engine.errors import UserError


def _epoch(loader, epoch):
    loader.next_epoch = epoch
    images, indices = [], []
    for x, _, i in loader:
        images.append(x.numpy().copy())
        indices.append(i.numpy().copy())
    return np.concatenate(images), np.concatenate(indices)


def _spec(root, indices):
    return LoaderSpec(root=str(root), split="train", batch_size=32, shuffle=True, drop_last=True, seed=7,
                      num_workers=1, indices=indices, decode_size=32, train=True)


def test_swapped_subset_matches_fresh_loader(digits_root):
    rng = np.random.default_rng(0)
    a = np.sort(rng.choice(1347, 300, replace=False))
    b = np.sort(rng.choice(1347, 500, replace=False))
    swapped = make_loader(_spec(digits_root, a))
    _epoch(swapped, 0)
    set_indices(swapped, b)
    fresh = make_loader(_spec(digits_root, b))
    assert len(swapped) == len(fresh) == 500 // 32
    for epoch in (3, 4):
        x_s, i_s = _epoch(swapped, epoch)
        x_f, i_f = _epoch(fresh, epoch)
        np.testing.assert_array_equal(i_s, i_f)
        np.testing.assert_array_equal(x_s, x_f)
        assert set(i_s) <= set(b.tolist())


def test_bad_subsets_are_refused(digits_root):
    loader = make_loader(_spec(digits_root, np.arange(64)))
    with pytest.raises(UserError, match="empty"):
        set_indices(loader, [])
    with pytest.raises(UserError, match="outside"):
        set_indices(loader, [0, 5000])

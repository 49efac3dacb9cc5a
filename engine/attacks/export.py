"""``dbd export-poisoned``: what the loader delivers before augmentation, as an .npz.

Arrays: ``images`` uint8 (n, H, W, 3), ``labels`` (after poisoning), ``true_labels``,
``poisoned`` (bool: trigger and, for dirty-label attacks, the new label), ``noise``
(bool: WaNet noise-mode samples, triggered with their true label), ``indices`` (the
dataset index of each row), ``targets`` (test split: each image's attack target, the
label ASR is scored against: the target class, or (y + 1) mod C for all-to-all); plus
``attack``, ``target`` and ``split``. The train split is the poisoned training set; the
test split is the poisoned test set (every test image whose label is not its target,
triggered, labels kept), or the clean test set when the attack is ``none``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.rundir import NO_ATTACK


def collect(loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, indices = [], [], []
    for x, y, i in loader:
        # Batches are views into FFCV's ring buffer: copy before the next ones arrive.
        images.append(x.numpy().copy())
        labels.append(y.numpy().copy())
        indices.append(i.numpy().copy())
    if not images:
        return np.zeros((0, 0, 0, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels), np.concatenate(indices)


def loader_for(cfg, split: str, indices: np.ndarray, poison, batch_size: int = 256):
    from engine.data.loaders import LoaderSpec, make_loader

    spec = LoaderSpec(root=cfg.data.root, split=split, batch_size=batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.data.num_workers, indices=np.asarray(indices, dtype=np.int64),
                      decode_size=cfg.data.decode_side, train=split == "train",
                      os_cache=cfg.data.os_cache)
    return make_loader(spec, poison=poison)


def export_poisoned(cfg, runtime, split: str, out: str | Path, *, limit: int | None = None,
                    poisoned_only: bool = False) -> dict:
    from engine.fsutil import atomic_path

    if split not in ("train", "test"):
        raise UserError(f"--split must be train or test, got {split!r}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    plan = runtime.plan
    if split == "train":
        indices = np.flatnonzero(runtime.train_selected) if poisoned_only else np.arange(len(plan.true_labels))
        ops = runtime.train_ops()
        true_labels, poisoned, noise = plan.true_labels, plan.poisoned, plan.noise
        targets = np.where(plan.poisoned, plan.labels, -1)  # the label a poisoned sample is given
    else:
        n_test = len(runtime.test_labels)
        indices = runtime.poisoned_test_indices if runtime.name != NO_ATTACK else np.arange(n_test)
        ops = runtime.test_ops()
        true_labels = runtime.test_labels
        poisoned = np.full(n_test, runtime.name != NO_ATTACK)
        noise = np.zeros(n_test, dtype=bool)
        targets = runtime.test_targets if runtime.name != NO_ATTACK else np.full(n_test, -1)
    if limit is not None:
        indices = indices[:limit]
    if len(indices) == 0:
        raise UserError(f"nothing to export: the {split} selection is empty")
    images, labels, got = collect(loader_for(runtime.cfg, split, indices, ops))
    if not np.array_equal(got, indices):
        raise RuntimeError("the loader returned samples in an unexpected order")
    arrays = dict(images=images, labels=labels.astype(np.int64), true_labels=true_labels[got],
                  poisoned=poisoned[got], noise=noise[got], indices=got.astype(np.int64),
                  targets=np.asarray(targets, dtype=np.int64)[got],
                  attack=np.array(runtime.name), target=np.int64(runtime.target), split=np.array(split))
    out = Path(out)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return {"file": str(out), "count": int(len(got)), "poisoned": int(arrays["poisoned"].sum()),
            "noise": int(arrays["noise"].sum()),
            "labels_changed": int((arrays["labels"] != arrays["true_labels"]).sum()),
            "image_shape": list(images.shape[1:])}

"""BA, ASR and RA against hand-computed values, all-to-one and all-to-all."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from engine.config import load_config


class Constant(nn.Module):
    """Predicts class ``k`` for every image."""

    def __init__(self, k: int, n: int = 10):
        super().__init__()
        self.register_buffer("logits", torch.eye(n)[k] * 10)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def _evaluator(root, run_dir, *overrides):
    from engine.attacks.runtime import build_poison
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta, RunData
    from engine.runtime.launch import DistInfo
    from engine.runtime.precision import Precision
    from engine.stages.evaluate import Evaluator

    cfg = load_config(None, ["device=cpu", "data.name=digits", f"data.root={root}", "data.num_workers=1",
                             "attack.name=badnets", "attack.target=0", "attack.ratio=0.1", *overrides])
    meta = load_meta(root)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="test")
    poison = build_poison(cfg, meta, run_dir)
    data = RunData(cfg.data, DatasetMeta.from_raw(meta), dist, cfg.seed, poison)
    return Evaluator(data, Precision("fp32")), poison


@pytest.mark.parametrize("k", [0, 4])
def test_all_to_all_asr_scores_every_image_against_y_plus_one(digits_root, tmp_path, k):
    evaluate, poison = _evaluator(digits_root, tmp_path, "attack.label_mode=all_to_all")
    y = poison.test_labels
    assert len(poison.poisoned_test_indices) == len(y) == 450  # no test image is dropped
    np.testing.assert_array_equal(poison.test_targets, (y + 1) % 10)
    got = evaluate(Constant(k))
    # Predicting k hits the target of exactly the images of class k - 1, and the true
    # label of the images of class k.
    assert got["ASR"] == pytest.approx(100 * np.mean(y == (k - 1) % 10))
    assert got["RA"] == pytest.approx(100 * np.mean(y == k))
    assert got["BA"] == pytest.approx(100 * np.mean(y == k))


def test_all_to_one_asr_leaves_out_the_target_class(digits_root, tmp_path):
    evaluate, poison = _evaluator(digits_root, tmp_path)
    y = poison.test_labels
    assert len(poison.poisoned_test_indices) == int((y != 0).sum())
    assert evaluate(Constant(0))["ASR"] == pytest.approx(100.0)
    got = evaluate(Constant(3))
    assert got["ASR"] == 0.0 and got["RA"] == pytest.approx(100 * (y == 3).sum() / (y != 0).sum())


def test_export_carries_each_test_images_target(digits_root, tmp_path):
    from engine.attacks.export import export_poisoned
    from engine.attacks.runtime import build_poison
    from engine.data.prepare import load_meta

    cfg = load_config(None, ["device=cpu", "data.name=digits", f"data.root={digits_root}", "data.num_workers=1",
                             "attack.name=badnets", "attack.ratio=0.1", "attack.label_mode=all_to_all",
                             f"run_dir={tmp_path}"])
    runtime = build_poison(cfg, load_meta(digits_root), tmp_path)
    export_poisoned(cfg, runtime, "test", tmp_path / "t.npz")
    z = np.load(tmp_path / "t.npz")
    assert len(z["targets"]) == 450
    np.testing.assert_array_equal(z["targets"], (z["true_labels"] + 1) % 10)

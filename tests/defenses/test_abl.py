"""ABL (engine/defenses/abl/): its loss, its isolated set, its batches, Cutout, the ascent,
the presets, 1 against 2 real (gloo) processes, and a killed run resumed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.config import load_config
from engine.defenses.abl.batches import epoch_order, global_steps, rank_pieces, recut
from engine.defenses.abl.cutout import cutout
from engine.defenses.abl.loss import floor_sign, floored_loss
from engine.defenses.abl.stage import ISOLATED, PRESETS
from tests.gloo import run_ranks


# --------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("kind", ["flooding", "lga"])
@pytest.mark.parametrize("margin", [0.0, 10.0])  # a batch loss above the 0.5 floor, and below it
def test_floored_gradient_is_sign_times_the_ce_gradient(kind, margin):
    torch.manual_seed(0)
    w = (torch.randn(5, 4) * 0.05).requires_grad_()
    x, y = torch.randn(8, 5), torch.arange(8) % 4
    ce = F.cross_entropy(x @ w + margin * F.one_hot(y, 4), y)
    (plain,) = torch.autograd.grad(ce, w, retain_graph=True)
    (floored,) = torch.autograd.grad(floored_loss(ce, kind, flooding=0.5, gamma=0.5), w, retain_graph=True)
    (signed,) = torch.autograd.grad(floor_sign(ce, kind, flooding=0.5, gamma=0.5) * ce, w)
    sign = 1.0 if ce.item() > 0.5 else -1.0  # by hand
    assert (ce.item() > 0.5) == (margin == 0.0)  # no margin: near-uniform softmax, CE ~ log 4
    torch.testing.assert_close(floored, sign * plain, rtol=0, atol=0)
    torch.testing.assert_close(signed, sign * plain, rtol=0, atol=0)


def test_floored_values():
    loss = torch.tensor(0.2)
    assert floored_loss(loss, "flooding", flooding=0.5, gamma=9.0).item() == pytest.approx(0.8)  # |0.2-0.5|+0.5
    assert floored_loss(loss, "lga", flooding=9.0, gamma=0.5).item() == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="unknown ABL loss"):
        floored_loss(loss, "mean", flooding=0.5, gamma=0.5)


# --------------------------------------------------------------------------- batches and Cutout

@pytest.mark.parametrize("n,batch,world", [(500, 128, 1), (500, 128, 2), (13, 4, 2), (9, 4, 2), (10, 4, 3)])
def test_rank_pieces_cover_each_global_batch_once(n, batch, world):
    order = epoch_order(np.arange(100, 100 + n), shuffle=True, seed=3, epoch=1)
    parts = [rank_pieces(order, batch, r, world) for r in range(world)]
    steps = global_steps(n, batch, world)
    assert all(len(sizes) == steps for _, sizes in parts)
    # Each global batch of the order is the ranks' pieces side by side; a tail batch
    # smaller than the world is the only thing left out.
    offsets = [0] * world
    for k in range(steps):
        pieces = []
        for r, (idx, sizes) in enumerate(parts):
            pieces.append(idx[offsets[r]:offsets[r] + sizes[k]])
            offsets[r] += sizes[k]
        np.testing.assert_array_equal(np.concatenate(pieces), order[k * batch:(k + 1) * batch])
    kept = sum(len(idx) for idx, _ in parts)
    assert kept == n if n % batch == 0 or n % batch >= world else kept == n - n % batch
    # The reference's 500 isolated images at batch 128: 4 ascent steps, the last of 116.
    if (n, batch, world) == (500, 128, 1):
        assert parts[0][1] == [128, 128, 128, 116]


def test_epoch_order_is_given_or_a_seeded_permutation():
    idx = np.array([7, 3, 9, 1])
    np.testing.assert_array_equal(epoch_order(idx, shuffle=False, seed=0, epoch=5), idx)
    a = epoch_order(idx, shuffle=True, seed=0, epoch=5)
    np.testing.assert_array_equal(a, epoch_order(idx, shuffle=True, seed=0, epoch=5))
    assert sorted(a) == sorted(idx)


def test_recut_regroups_loader_batches_in_order():
    images = torch.arange(10).view(10, 1)
    loader = [(images[i:i + 4], torch.arange(i, min(i + 4, 10)), torch.arange(i, min(i + 4, 10)))
              for i in range(0, 10, 4)]
    out = list(recut(loader, [3, 3, 3, 1]))
    assert [len(b[1]) for b in out] == [3, 3, 3, 1]
    np.testing.assert_array_equal(torch.cat([b[0] for b in out]).view(-1).numpy(), np.arange(10))
    with pytest.raises(RuntimeError, match="ran out"):
        list(recut(loader, [8, 8]))


def _reference_cutout(img: np.ndarray, length: int, y: int, x: int) -> np.ndarray:
    """The reference's Cutout(1, length) on a CHW [0, 1] image, its centre given."""
    h, w = img.shape[1:]
    mask = np.ones((h, w), np.float32)
    y1, y2 = np.clip(y - length // 2, 0, h), np.clip(y + length // 2, 0, h)
    x1, x2 = np.clip(x - length // 2, 0, w), np.clip(x + length // 2, 0, w)
    mask[y1:y2, x1:x2] = 0.0
    return img * mask


def test_cutout_matches_the_reference_on_unnormalised_pixels():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    rng = np.random.default_rng(0)
    raw = rng.random((6, 3, 8, 8)).astype(np.float32)
    m, s = np.array(mean, np.float32).reshape(1, 3, 1, 1), np.array(std, np.float32).reshape(1, 3, 1, 1)
    views = torch.from_numpy((raw - m) / s)
    for length in (3, 4):
        out = cutout(views, length, mean, std, torch.Generator().manual_seed(5)).numpy() * s + m
        g = torch.Generator().manual_seed(5)  # the same centres the function draws
        ys, xs = torch.randint(0, 8, (6,), generator=g), torch.randint(0, 8, (6,), generator=g)
        want = np.stack([_reference_cutout(raw[i], length, int(ys[i]), int(xs[i])) for i in range(6)])
        np.testing.assert_allclose(out, want, atol=1e-6)
        assert (want != raw).any()  # the centres drawn do cut holes


# --------------------------------------------------------------------------- presets

def test_presets_fill_only_what_is_not_set():
    cfg = load_config(None, ["abl.preset=backdoorbench", "abl.unlearning_lr=0.001"])
    assert cfg.abl.isolation_epochs == 20 and cfg.abl.batch_size == 256 and cfg.abl.cutout is False
    assert cfg.abl.unlearning_lr == 0.001  # explicit wins
    ref = load_config(None, []).abl
    for key, value in PRESETS["bboylyg"].items():
        assert getattr(ref, key) == value
    assert (ref.finetune_epochs, ref.finetune_milestones, ref.isolation_ratio, ref.view.padding_mode) == \
        (60, (40,), 0.01, "constant")


def test_bad_settings_are_one_clear_error():
    from engine.errors import UserError

    with pytest.raises(UserError, match="abl.preset"):
        load_config(None, ["abl.preset=paper"])
    with pytest.raises(UserError, match="abl.loss"):
        load_config(None, ["abl.loss=mse"])


# --------------------------------------------------------------------------- the stage on real data

@pytest.fixture(scope="module")
def color_root(tmp_path_factory) -> Path:
    from tests.builders import prepared_color_cifar

    return prepared_color_cifar(tmp_path_factory.mktemp("abl-colors"), n_per_batch=40)


def _stage(root: Path, run_dir: Path, rank: int = 0, world: int = 1, *extra: str):
    """The ABL stage, built as ``dbd run`` builds it, over the planted colour set."""
    from engine.pipeline import make_stage
    from tests.gloo import rank_data

    cfg = load_config(None, [f"data.root={root}", "data.name=cifar10", "data.num_workers=1", "attack.target=0",
                             "attack.ratio=0.1", "attack.select_from=all", f"run_dir={run_dir}", "model.width=4",
                             "stages=[abl]", "abl.batch_size=32", "abl.isolation_ratio=0.1",
                             "abl.isolation_epochs=1", "abl.finetune_epochs=1", "abl.unlearning_epochs=1",
                             "logging.progress=false", *extra])
    data = rank_data(cfg, run_dir, rank, world)
    stage = make_stage(cfg, "abl", run_dir=Path(run_dir), dist=data.dist, data=data)
    torch.manual_seed(cfg.seed)
    stage.build()
    return cfg, data, stage


def test_isolated_set_is_the_numpy_argsort_of_per_sample_ce(color_root, tmp_path):
    cfg, data, stage = _stage(color_root, tmp_path)
    isolated = stage.isolate(1)
    # The oracle: plain CE of every training image (normalised, no augmentation) against
    # its given label, by a model in eval mode, ranked by NumPy.
    model = stage.backend.module.eval()
    mean, std = torch.tensor(cfg.data.mean).view(1, 3, 1, 1), torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    losses = np.zeros(data.meta.train_count)
    with torch.no_grad():
        for images, labels, idx in data.scoring_loader(np.arange(data.meta.train_count)):
            x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
            losses[idx.numpy()] = F.cross_entropy(model(x), labels, reduction="none").double().numpy()
    k = int(0.1 * data.meta.train_count)
    np.testing.assert_array_equal(isolated, np.sort(np.argsort(losses, kind="stable")[:k]))


def test_ascent_raises_the_loss_on_the_isolated_batch(color_root, tmp_path):
    _, _, stage = _stage(color_root, tmp_path, 0, 1, "abl.unlearning_lr=0.05")
    stage.isolate(1)
    unlearning = 2
    assert stage.phase(unlearning) == "unlearning"
    stage.on_epoch_start(unlearning)
    assert stage.fresh_optimizer and stage.backend.get_lr() == pytest.approx(0.05)
    batch = next(iter(stage.batches(unlearning)))
    assert set(batch[2].tolist()) <= set(stage.isolated.tolist())
    x, y = stage.prepare(batch, unlearning, 0)
    module = stage.backend.module

    def ce() -> float:
        module.eval()
        with torch.no_grad():
            return float(F.cross_entropy(module(x), y))

    before = ce()
    module.train()
    out = stage.update((x, y), unlearning, 0)
    assert float(out["objective"]) < 0
    assert ce() > before


def test_state_survives_a_checkpoint(color_root, tmp_path):
    _, _, stage = _stage(color_root, tmp_path)
    stage.isolate(1)
    stage.fresh_optimizer = True
    _, _, again = _stage(color_root, tmp_path)
    again.load_state_dict(stage.state_dict())
    np.testing.assert_array_equal(again.isolated, stage.isolated)
    assert again.fresh_optimizer
    again.on_epoch_start(1)  # restored: no re-scoring, no second fresh optimizer
    np.testing.assert_array_equal(again.isolated, stage.isolated)


def _worker(rank, world, root, run_dir, out):
    _, _, stage = _stage(Path(root), Path(run_dir), rank, world)
    isolated = stage.isolate(1)
    if rank == 0:
        np.save(out, isolated)


def test_isolation_identical_in_one_and_two_processes(color_root, tmp_path):
    _, _, stage = _stage(color_root, tmp_path / "one")
    single = stage.isolate(1)
    out = tmp_path / "two.npy"
    (tmp_path / "two").mkdir()
    _stage(color_root, tmp_path / "two")  # the poison plan is drawn once; both ranks load it
    run_ranks(_worker, 2, str(color_root), str(tmp_path / "two"), str(out))
    np.testing.assert_array_equal(np.load(out), single)


# --------------------------------------------------------------------------- a killed run resumed

def test_killed_in_fine_tuning_then_resumed_equals_the_uninterrupted_run(digits_root, tmp_path):
    from tests.runtime.helpers import killed_and_resumed, max_weight_diff

    changes = {"stages": ["abl"], "abl": {"batch_size": 256, "isolation_epochs": 1, "finetune_epochs": 1,
                                           "unlearning_epochs": 1, "isolation_ratio": 0.05}}
    # 6 isolation steps (1,347 images at 256, the partial batch kept), then fine-tuning.
    # A checkpoint every 2 steps: the kill before global step 8 leaves the one after
    # fine-tuning's second step, which holds the isolated set and the fresh SGD.
    second = killed_and_resumed(tmp_path, digits_root, "8:0:kill", **changes)
    assert "[abl] isolated" not in second.stdout.split("resuming from")[1]  # restored, not re-scored
    a, b = (torch.load(tmp_path / f"run-{n}" / "abl" / "model.pt", weights_only=True) for n in ("whole", "killed"))
    assert max_weight_diff(a, b) < 1e-6
    iso = [torch.load(tmp_path / f"run-{n}" / "abl" / ISOLATED, weights_only=True)["isolated"]
           for n in ("whole", "killed")]
    torch.testing.assert_close(iso[0], iso[1], rtol=0, atol=0)

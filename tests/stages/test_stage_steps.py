"""The stages' steps and the Trainer's resume, in process, on tiny models.

Each step is driven through the real Stage object (``engine.pipeline.make_stage``, as
``dbd run`` builds it) and checked against an independent computation written here:
the DBD reference's NT-Xent formula with a hand-applied SGD update, and the MixMatch
ramp and EMA by hand. Resume is checked against an uninterrupted run of the same stage.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.config import load_config
from engine.fsutil import write_json
from engine.runtime.checkpoint import save_final_model

TINY = ["device=cpu", "data.name=digits", "data.num_workers=1", "model.width=4", "logging.progress=false",
        "logging.log_every=0", "attack.name=badnets", "attack.target=0", "attack.ratio=0.1",
        "attack.select_from=all", "data.horizontal_flip=false"]


def _stage(root: Path, run_dir: Path, name: str, *overrides: str):
    from engine.attacks.runtime import build_poison
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta, RunData
    from engine.pipeline import make_stage
    from engine.runtime.launch import DistInfo

    cfg = load_config(None, TINY + [f"data.root={root}", f"run_dir={run_dir}", *overrides])
    meta = load_meta(root)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="test")
    run_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(cfg.data, DatasetMeta.from_raw(meta), dist, cfg.seed, build_poison(cfg, meta, run_dir))
    stage = make_stage(cfg, name, run_dir=run_dir, dist=dist, data=data)
    torch.manual_seed(cfg.seed)
    stage.build()
    return cfg, stage


def _first_batch(stage, epoch: int = 0):
    it = iter(stage.batches(epoch))
    batch = next(it)
    it.close()
    return batch


def _reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The DBD code's loss, written out: anchors z1, candidates all 2N but the anchor."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    losses = []
    for i in range(n):
        sims = torch.stack([z[i] @ z[j] / t for j in range(2 * n) if j != i])
        positive = z[i] @ z[n + i] / t
        losses.append(-(positive - torch.logsumexp(sims, dim=0)))
    return torch.stack(losses).mean()


def test_simclr_step_is_the_reference_loss_and_one_sgd_step(digits_root, tmp_path):
    cfg, stage = _stage(digits_root, tmp_path / "run", "pretrain", "pretrain.batch_size=16",
                        "pretrain.sync_bn=false", "distributed.channels_last=false")
    stage.backend.set_lr(0.05)
    before = copy.deepcopy(stage.backend.module)
    x = stage.prepare(_first_batch(stage), 0, 0)
    assert x.shape == (32, 3, 32, 32)
    out = stage.update(x, 0, 0)

    # The oracle: the same forward on a copy, the loss by the formula above, then SGD
    # with momentum (first step: the buffer is the gradient) and weight decay by hand.
    before.train()
    z = before(x)
    want = _reference_ntxent(z[:16], z[16:], cfg.pretrain.temperature)
    assert float(out["loss"]) == pytest.approx(float(want.detach()), rel=1e-5)
    want.backward()
    wd = cfg.pretrain.weight_decay
    for (name, p0), p1 in zip(before.named_parameters(), stage.backend.module.parameters()):
        expected = p0.detach() - 0.05 * (p0.grad + wd * p0.detach())
        torch.testing.assert_close(p1.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


def _linear_upstream(run_dir: Path, cfg, epochs: int) -> None:
    from engine.models import Classifier

    (run_dir / "linear").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    save_final_model(run_dir / "linear" / "model.pt", Classifier(cfg.model.arch, cfg.model.width, 10))
    write_json(run_dir / "linear" / "done.json", {"stage": "linear", "epochs": epochs})


@pytest.mark.parametrize("include_linear", [True, False])
def test_mixmatch_step_ramp_and_ema(digits_root, tmp_path, include_linear):
    run_dir = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.root={digits_root}"])
    _linear_upstream(run_dir, cfg, epochs=7)
    cfg, stage = _stage(digits_root, run_dir, "finetune", "finetune.batch_size=8", "finetune.iterations_per_epoch=4",
                        "finetune.rampup_epochs=20", "finetune.ema_decay=0.9", "finetune.adam_from_linear=false",
                        f"finetune.ramp_includes_linear={str(include_linear).lower()}")
    stage.on_epoch_start(2)  # the split, with the linear model, and the loaders over its two parts
    assert len(stage.split.labelled) == int(cfg.finetune.epsilon * 1347)
    batch = _first_batch(stage, 2)
    ema_before = copy.deepcopy(stage.ema.module.state_dict())
    out = stage.train_step(batch, 2, 3)

    # lambda_u = 15 * clip((linear epochs + epoch + step / iterations) / rampup, 0, 1)
    current = (7 if include_linear else 0) + 2 + 3 / 4
    assert out["lambda_u"] == pytest.approx(15.0 * min(current / 20, 1.0))
    assert math.isfinite(float(out["loss"]))
    assert float(out["loss"]) == pytest.approx(float(out["loss_x"]) + out["lambda_u"] * float(out["loss_u"]),
                                               rel=1e-5)
    # EMA after one step: 0.9 * old + 0.1 * new for every float tensor, a copy otherwise.
    new = stage.backend.module.state_dict()
    for k, e in stage.ema.module.state_dict().items():
        if e.is_floating_point():
            torch.testing.assert_close(e, 0.9 * ema_before[k] + 0.1 * new[k], rtol=1e-5, atol=1e-7, msg=k)
        else:
            assert torch.equal(e, new[k]), k
    assert stage.eval_module() is stage.ema.module


class _Interrupted(RuntimeError):
    pass


def _train(root: Path, run_dir: Path, *, interrupt_at: int | None = None):
    from engine.stages.trainer import Trainer

    cfg, stage = _stage(root, run_dir, "supervised", "supervised.epochs=2", "supervised.batch_size=32",
                        "supervised.iterations_per_epoch=5", "supervised.milestones=[1]")
    if interrupt_at is not None:
        real_step, calls = stage.train_step, {"n": 0}

        def step(batch, epoch, i):
            if calls["n"] == interrupt_at:
                raise _Interrupted(f"at global step {interrupt_at}")
            calls["n"] += 1
            return real_step(batch, epoch, i)

        stage.train_step = step
    trainer = Trainer(stage, logging=cfg.logging, checkpoint_every=2)
    return trainer.fit(), stage


def test_mid_epoch_resume_reproduces_the_uninterrupted_run(digits_root, tmp_path):
    straight, stage = _train(digits_root, tmp_path / "straight")
    want = {k: v.clone() for k, v in stage.backend.module.state_dict().items()}

    # 5 steps per epoch, a checkpoint every 2 steps and at epoch ends: cut after 7 steps
    # (epoch 1, step 2), the newest checkpoint is the one after 6 steps (epoch 1, step 1).
    with pytest.raises(_Interrupted):
        _train(digits_root, tmp_path / "cut", interrupt_at=7)
    resumed, stage = _train(digits_root, tmp_path / "cut")
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("e00001-s0000001")
    assert resumed.global_step == straight.global_step == 10
    got = stage.backend.module.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)
    assert [round(r["loss"], 5) for r in resumed.history] == [round(r["loss"], 5) for r in straight.history]


def test_labelled_only_ablation_trains_on_the_labelled_part_alone(digits_root, tmp_path):
    from engine.stages.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.root={digits_root}"])
    _linear_upstream(run_dir, cfg, epochs=1)
    cfg, stage = _stage(digits_root, run_dir, "finetune_labelled", "finetune_labelled.epochs=2",
                        "finetune_labelled.batch_size=64", "finetune_labelled.epsilon=0.2")
    seen: dict[int, set] = {}
    real_step = stage.train_step

    def step(batch, epoch, i):
        seen.setdefault(epoch, set()).update(batch[2].tolist())
        return real_step(batch, epoch, i)

    stage.train_step = step
    result = Trainer(stage, logging=cfg.logging).fit()
    n_labelled = int(0.2 * 1347)
    assert result.epochs == 2 and stage.steps_per_epoch == n_labelled // 64
    assert len(stage.split.labelled) == n_labelled
    # The last epoch's batches come from that epoch's labelled part only.
    assert seen[1] <= set(stage.split.labelled.tolist())
    assert len(seen[1]) == stage.steps_per_epoch * 64


@pytest.mark.parametrize("carry", [True, False])
def test_one_adam_from_the_linear_stage_into_mixmatch(digits_root, tmp_path, carry):
    """The reference's single Adam: fine-tuning starts from the head's moments and steps."""
    from engine.models import SimCLRModel
    from engine.stages.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.root={digits_root}"])
    (run_dir / "pretrain").mkdir(parents=True)
    save_final_model(run_dir / "pretrain" / "model.pt", SimCLRModel(cfg.model.arch, cfg.model.width))
    write_json(run_dir / "pretrain" / "done.json", {"stage": "pretrain"})
    cfg, linear = _stage(digits_root, run_dir, "linear", "linear.epochs=1", "linear.iterations_per_epoch=3")
    Trainer(linear, logging=cfg.logging).run()
    head = dict(linear.backend.module.named_parameters())["classifier.weight"]
    want = linear.backend.optimizer.state[head]
    assert int(want["step"]) == 3

    _, finetune = _stage(digits_root, run_dir, "finetune", f"finetune.adam_from_linear={str(carry).lower()}",
                         "finetune.batch_size=8")
    params = dict(finetune.backend.module.named_parameters())
    state = finetune.backend.optimizer.state
    if carry:
        got = state[params["classifier.weight"]]
        assert int(got["step"]) == 3
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(got["exp_avg_sq"], want["exp_avg_sq"], rtol=0, atol=0)
        # The backbone never had a gradient in the linear stage: its moments start fresh.
        assert params["backbone.conv1.weight"] not in state
    else:
        assert len(state) == 0

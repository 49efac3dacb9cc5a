"""``distributed.compile`` against eager, on a CPU: the same stage, seed and batch, one
step each; the compiled step (TorchInductor's generated code, the same graphs as on a
GPU but for the CPU) must give the eager loss and the eager weights.

MixMatch is the stage it matters most for (the reference runs 194,560 small fixed-shape
steps) and the hardest case: several interleaved forwards through one wrapper call,
train-mode label guessing, mixup. ``reduce-overhead`` adds CUDA graphs on CUDA; on a CPU
it compiles the same code without them, which is what this checks.
"""
from __future__ import annotations

import pytest
import torch

from engine.config import load_config
from tests.stages.test_stage_steps import TINY, _first_batch, _linear_upstream, _stage

pytestmark = pytest.mark.slow
WIDTH = "model.width=8"


@pytest.mark.parametrize("mode", ["reduce-overhead"])
def test_compiled_mixmatch_step_matches_eager(digits_root, tmp_path, mode):
    # Width 8: Inductor picks channels_last for convolutions by itself, and a width-4 net's
    # 1x1 shortcut then meets oneDNN's AVX2 weight-gradient kernel that aborts for fewer
    # than 8 input channels (engine/models/resnet.py keeps eager out of it, not Inductor).
    cfg = load_config(None, TINY + [f"data.root={digits_root}", WIDTH])
    results = {}
    for compiled in (False, True):
        run_dir = tmp_path / ("compiled" if compiled else "eager")
        _linear_upstream(run_dir, cfg, epochs=1)
        _, stage = _stage(digits_root, run_dir, "finetune", WIDTH, "finetune.batch_size=8",
                          "finetune.adam_from_linear=false",
                          "distributed.channels_last=false", f"distributed.compile={str(compiled).lower()}",
                          f"distributed.compile_mode={mode}")
        stage.on_epoch_start(0)
        out = stage.train_step(_first_batch(stage, 0), 0, 0)
        # The step's gradients (the step zeroes them before its backward), not the weights:
        # Adam's first update is lr * sign(g), which float noise can flip where g ~ 0.
        grads = {k: p.grad.detach().clone() for k, p in stage.backend.module.named_parameters()}
        buffers = {k: b.detach().clone() for k, b in stage.backend.module.named_buffers()}
        results[compiled] = (float(out["loss"]), grads, buffers)
    (eager_loss, eager_g, eager_b), (comp_loss, comp_g, comp_b) = results[False], results[True]
    assert comp_loss == pytest.approx(eager_loss, rel=1e-4)
    assert eager_g.keys() == comp_g.keys() and len(eager_g) > 10
    for k in eager_g:
        # Relative L2 error per tensor. Measured on a 2-core AMD EPYC: at most 0.5%
        # (the first convolution and BatchNorm: inductor fuses and reorders float sums, and
        # train-mode BatchNorm over 8 samples amplifies that). A wrong graph (a chunk
        # dropped or mis-interleaved, a stale weight) is off by tens of percent.
        err = float((comp_g[k] - eager_g[k]).norm() / eager_g[k].norm().clamp_min(1e-12))
        assert err < 2e-2, (k, err)
    for k in eager_b:  # BatchNorm running statistics, updated by the train-mode forwards
        torch.testing.assert_close(comp_b[k].float(), eager_b[k].float(), rtol=1e-4, atol=1e-6, msg=k)

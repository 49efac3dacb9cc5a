"""Every stage under every shipped DeepSpeed JSON, against the same stage on DDP in fp32.

One child process (tests/stages/stage_matrix.py) builds each real stage on in-memory
data and takes two steps and an evaluation under each DeepSpeed config. Each stage
must train (every trainable tensor moves), keep the parameter dtype its config asks
for, and follow DDP fp32's losses: to float rounding under zero0_fp32; under 16-bit
autocast and DeepSpeed's own bf16, within 2% at the first step (measured: at most
0.2%) and 10% at the second (measured: at most 2.6%). DeepSpeed's own fp16
mode (zero2_fp16) runs only where DeepSpeed accepts fp16 on the CPU. Where it does not,
its bf16 twin (zero2_fp16.json with bf16 in place of fp16) runs the same path, the one
where DeepSpeed owns the precision.
"""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.runtime.backends import cast_inputs_to_parameters, resolve_ds_config
from tests.runtime.helpers import REPO, check, run
from tests.stages.stage_matrix import JSONS, NATIVE_BF16, stage_names

STAGES = stage_names()

NATIVE = {"zero2_fp16": "torch.float16", NATIVE_BF16: "torch.bfloat16"}  # DeepSpeed owns the weights' dtype


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed-stages") / "matrix.json"
    check(run([sys.executable, "-m", "tests.stages.stage_matrix", "deepspeed", out], timeout=600))
    return json.loads(out.read_text())["runs"]


def test_the_matrix_covers_every_shipped_json():
    assert set(JSONS) == {p.stem for p in (REPO / "configs" / "deepspeed").glob("*.json")}


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("ds", JSONS + (NATIVE_BF16,))
def test_stage_trains_under_deepspeed_config(matrix, ds, stage):
    got, ref = matrix[f"{ds}/{stage}"], matrix[f"ddp/{stage}"]
    if "skip" in got:
        pytest.skip(got["skip"])
    assert "error" not in ref, ref.get("traceback")
    assert "error" not in got, got.get("traceback")
    assert got["trainable"] > 0 and got["changed"] == got["trainable"]
    assert got["dtypes"] == [NATIVE.get(ds, "torch.float32")]
    assert all(math.isfinite(v) for v in got["losses"])
    if ds.endswith("fp32"):
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    else:
        # The first step differs only by the forward's rounding; after one 16-bit update
        # the weights differ too (SimCLR at lr 0.4: 2.6% by step 2, measured). A loss
        # scale left in the update, or a wrong dtype, is off by orders of magnitude.
        assert got["losses"][0] == pytest.approx(ref["losses"][0], rel=2e-2)
        assert got["losses"][1:] == pytest.approx(ref["losses"][1:], rel=1e-1)
    assert (got["BA"] is None) == (stage == "pretrain")  # evaluation ran where the stage evaluates
    assert not got["imported_ffcv"]


class _UpcastingHead(nn.Module):
    """A frozen part whose output is upcast before a trained head, as the linear stage does."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.body(x).float())


def test_inputs_are_cast_to_each_modules_own_dtype():
    torch.manual_seed(0)
    model = _UpcastingHead().to(torch.bfloat16)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError):
        model(x)  # fp32 into bf16 weights, as DeepSpeed's own 16-bit modes leave it
    assert cast_inputs_to_parameters(model) == 3  # the conv, the BatchNorm and the head: the modules with weights
    out = model(x)
    assert out.dtype == torch.bfloat16
    # The same arithmetic by hand: every module fed its own dtype.
    with torch.no_grad():
        want = model.head(model.body(x.to(torch.bfloat16)))
        torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
        ema = copy.deepcopy(model)  # MixMatch's EMA copies the hooked model
        torch.testing.assert_close(ema(x), want, rtol=0, atol=0)


def test_deepspeed_owned_precision_keeps_batchnorm_buffers_with_its_weights(tmp_path):
    cfg = load_config(None, ["precision=fp16", "distributed.engine=deepspeed",
                             "distributed.deepspeed_config=configs/deepspeed/zero2_fp16.json"])
    ds = resolve_ds_config(cfg.distributed, "fp16", per_rank_batch=8, world_size=1, per_layer_optimizer=False)
    assert ds["data_types"]["buffer_dtype"] == "fp16"
    # Under torch autocast the weights and buffers stay fp32: nothing to add.
    cfg = load_config(None, ["precision=fp16", "distributed.engine=deepspeed",
                             "distributed.deepspeed_config=configs/deepspeed/zero0_fp16.json"])
    ds = resolve_ds_config(cfg.distributed, "fp16", per_rank_batch=8, world_size=1, per_layer_optimizer=False)
    assert "data_types" not in ds
    # A JSON that states its buffer dtype keeps it.
    own = json.loads((REPO / "configs" / "deepspeed" / "zero2_fp16.json").read_text())
    own["data_types"] = {"buffer_dtype": "fp32"}
    path = Path(tmp_path) / "own.json"
    path.write_text(json.dumps(own))
    cfg = load_config(None, ["precision=fp16", "distributed.engine=deepspeed", f"distributed.deepspeed_config={path}"])
    ds = resolve_ds_config(cfg.distributed, "fp16", per_rank_batch=8, world_size=1, per_layer_optimizer=False)
    assert ds["data_types"]["buffer_dtype"] == "fp32"

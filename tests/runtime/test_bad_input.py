"""Bad input ends the run with one clear line (exit 2) before any training step."""
from __future__ import annotations

import json

import pytest

from engine.config import load_config
from engine.errors import UserError
from engine.pipeline import preflight
from engine.runtime.backends import resolve_ds_config
from tests.runtime.helpers import dbd_cmd, free_port, run, run_dir, torchrun_cmd, write_config


def _cfg(**overrides):
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()] + ["stages=[pretrain]"])


def _no_training(rdir) -> None:
    metrics = rdir / "metrics.jsonl"
    steps = [line for line in metrics.read_text().splitlines() if '"step"' in line] if metrics.is_file() else []
    assert steps == []
    assert not (rdir / "pretrain" / "checkpoints").exists()


def test_unknown_backend_is_a_one_line_error(tmp_path, digits_root):
    cfg = write_config(tmp_path, digits_root, **{"distributed.engine": "horovod"})
    proc = run(dbd_cmd(cfg), timeout=120)
    assert proc.returncode == 2
    assert "distributed.engine 'horovod' is unknown" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_deepspeed_config_contradicting_the_run_config(tmp_path, digits_root):
    cfg = write_config(tmp_path, digits_root, precision="fp32", **{
        "distributed.engine": "deepspeed", "distributed.deepspeed_config": "configs/deepspeed/zero0_bf16.json"})
    proc = run(dbd_cmd(cfg), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "trains in bf16 but the run config says precision=fp32" in proc.stderr
    _no_training(run_dir(cfg))


@pytest.mark.slow
def test_world_size_must_divide_the_global_batch(tmp_path, digits_root):
    cfg = write_config(tmp_path, digits_root, **{"pretrain.batch_size": 33})
    proc = run(torchrun_cmd("--nproc_per_node", "2", "--master_port", free_port(), "-m", "engine", "run", cfg),
               timeout=300)
    assert proc.returncode != 0
    assert "pretrain.batch_size=33 is a global batch" in proc.stderr
    assert "must divide evenly over 2 processes" in proc.stderr
    _no_training(run_dir(cfg))


def test_preflight_checks_every_stage_batch():
    cfg = _cfg(**{"linear.batch_size": 30})
    with pytest.raises(UserError, match="linear.batch_size=30 is a global batch"):
        preflight(load_config(None, ["linear.batch_size=30"]), 4)
    preflight(cfg, 2)  # 30 and 512 split over 2
    per_rank = _cfg(**{"distributed.batch_semantics": "per_rank", "pretrain.batch_size": 33})
    preflight(per_rank, 2)  # per-rank batches need not divide


@pytest.mark.parametrize("change, message", [
    ({"optimizer": {"type": "Adam", "params": {"lr": 0.1}}}, "has an 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "has an 'scheduler' section"),
    ({"train_batch_size": 64}, "sets train_batch_size=64 but the run config implies 32"),
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu=8 but the run config implies 16"),
    ({"gradient_clipping": 1.0}, "gradient_clipping=1.0 but distributed.grad_clip=0.0"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "several precisions"),
])
def test_deepspeed_config_contradictions(tmp_path, change, message):
    ds = {"zero_optimization": {"stage": 0}, "gradient_clipping": 0.0, **change}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    precision = "bf16" if "bf16" in change else "fp32"
    cfg = _cfg(precision=precision, **{"distributed.engine": "deepspeed", "distributed.deepspeed_config": str(path),
                                       "pretrain.batch_size": 32})
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        resolve_ds_config(cfg.distributed, cfg.precision, per_rank_batch=16, world_size=2, per_layer_optimizer=False)


def test_deepspeed_config_is_completed_explicitly(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1},
                                "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}))
    cfg = _cfg(precision="bf16", **{"distributed.engine": "deepspeed", "distributed.deepspeed_config": str(path)})
    ds = resolve_ds_config(cfg.distributed, cfg.precision, per_rank_batch=16, world_size=2, per_layer_optimizer=False)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0  # never DeepSpeed's silent 1.0 default


@pytest.mark.parametrize("name", ["zero1_bf16.json", "zero2_bf16.json", "zero2_fp16.json"])
def test_lars_is_refused_with_flattening_deepspeed_configs(name):
    precision = "fp16" if "fp16" in name else "bf16"
    cfg = _cfg(precision=precision, **{"distributed.engine": "deepspeed", "pretrain.optimizer": "lars",
                                       "distributed.deepspeed_config": f"configs/deepspeed/{name}"})
    with pytest.raises(UserError, match="LARS needs per-layer trust ratios"):
        preflight(cfg, 1)


def test_lars_is_accepted_with_zero0_autocast():
    cfg = _cfg(precision="bf16", **{"distributed.engine": "deepspeed", "pretrain.optimizer": "lars",
                                    "distributed.deepspeed_config": "configs/deepspeed/zero0_bf16.json"})
    preflight(cfg, 1)


def test_missing_deepspeed_config():
    cfg = _cfg(**{"distributed.engine": "deepspeed", "distributed.deepspeed_config": "no/such.json"})
    with pytest.raises(UserError, match="no/such.json not found"):
        preflight(cfg, 1)


@pytest.mark.parametrize("name", ["zero0_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16", "zero0_fp16", "zero2_fp16"])
def test_shipped_deepspeed_configs_are_consistent(name):
    precision = name.split("_")[1]
    cfg = _cfg(precision=precision, **{"distributed.engine": "deepspeed",
                                       "distributed.deepspeed_config": f"configs/deepspeed/{name}.json"})
    ds = resolve_ds_config(cfg.distributed, cfg.precision, per_rank_batch=8, world_size=2, per_layer_optimizer=False)
    assert ds["gradient_clipping"] == 0.0

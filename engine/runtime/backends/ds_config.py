"""A DeepSpeed JSON read, checked against the run's config and resolved (batch sizes,
precision): what the DeepSpeed backend trains with and what a stage's key holds."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.errors import UserError


def deepspeed_args(dist) -> argparse.Namespace:
    """What deepspeed.initialize reads besides the config: the device to take.

    DeepSpeed takes ``cuda:LOCAL_RANK`` unless ``args.device_rank`` says otherwise; with
    one visible GPU per process (srun --gpus-per-task 1) the index is 0 on every rank,
    while LOCAL_RANK must stay the launcher's (engine.runtime.device)."""
    return argparse.Namespace(device_rank=dist.device.index if dist.device.type == "cuda" else dist.local_rank)


def ds_precision(ds: dict) -> str:
    """The precision a DeepSpeed config asks for: fp32 | bf16 | fp16."""
    native = [p for p in ("bf16", "fp16") if isinstance(ds.get(p), dict) and ds[p].get("enabled", False)]
    auto = ds.get("torch_autocast", {})
    if auto.get("enabled", False):
        dt = str(auto.get("dtype", "bfloat16"))
        native.append({"bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
                       "torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(dt, dt))
    if len(native) > 1:
        raise UserError(f"deepspeed config enables several precisions at once ({', '.join(native)})")
    return native[0] if native else "fp32"


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file() and not p.is_absolute():
        # The shipped configs/deepspeed/*.json also resolve from outside the checkout.
        shipped = Path(__file__).resolve().parents[3] / p  # the checkout: engine/runtime/backends/..
        p = shipped if shipped.is_file() else p
    if not p.is_file():
        raise UserError(f"distributed.deepspeed_config {path} not found")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"distributed.deepspeed_config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise UserError(f"distributed.deepspeed_config {path} must hold a JSON object")
    return ds


def resolve_ds_config(distributed, precision: str, *, per_rank_batch: int, world_size: int,
                      per_layer_optimizer: bool) -> dict:
    """The DeepSpeed config for this run, or a UserError where it contradicts the run config
    (``distributed`` is the config's section, ``precision`` its fp32 | bf16 | fp16)."""
    path = distributed.deepspeed_config
    ds = load_ds_config(path)
    where = f"deepspeed config {path}"
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(f"{where} has an {key!r} section: the stage builds its own {key} "
                            f"(and schedule) from the run config; remove it")
    prec = ds_precision(ds)
    if prec != precision:
        raise UserError(f"{where} trains in {prec} but the run config says precision={precision}: "
                        f"make them agree (e.g. precision={prec}, or a configs/deepspeed/*_{precision}.json)")
    want = {"train_micro_batch_size_per_gpu": per_rank_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": per_rank_batch * world_size}
    for key, value in want.items():
        if key in ds and ds[key] != "auto" and int(ds[key]) != value:
            raise UserError(f"{where} sets {key}={ds[key]} but the run config implies {value} "
                            f"(batch sizes come from the stage config and distributed.batch_semantics; "
                            f"remove {key} from the JSON)")
        ds[key] = value
    clip = float(distributed.grad_clip)
    if "gradient_clipping" in ds and float(ds["gradient_clipping"]) != clip:
        raise UserError(f"{where} sets gradient_clipping={ds['gradient_clipping']} but "
                        f"distributed.grad_clip={clip}: make them agree")
    # DeepSpeed >= 0.19.3 silently clips at 1.0 unless told otherwise.
    ds["gradient_clipping"] = clip
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2):
        raise UserError(f"{where} uses ZeRO stage {stage}: only stages 0, 1 and 2 are supported")
    flattening = stage > 0 or any(isinstance(ds.get(p), dict) and ds[p].get("enabled", False) for p in ("bf16", "fp16"))
    if per_layer_optimizer and flattening:
        raise UserError(f"LARS needs per-layer trust ratios, but {where} flattens parameters into partitions "
                        f"(ZeRO stage {stage} or DeepSpeed's own bf16/fp16 optimizer): use optimizer sgd, "
                        f"or a ZeRO-0 torch_autocast config such as configs/deepspeed/zero0_{precision}.json")
    if any(isinstance(ds.get(p), dict) and ds[p].get("enabled", False) for p in ("bf16", "fp16")):
        # DeepSpeed >= 0.19 casts only the parameters in its own 16-bit modes and keeps the
        # buffers in fp32; BatchNorm then meets 16-bit weights with fp32 running statistics
        # and fails ("expected scalar type ... but found Float"). Its buffers follow the
        # weights, as they did under DeepSpeed's older module.half(), unless the JSON says.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", prec)
    # Our optimizers are plain torch ones (SGD, Adam, LARS); ZeRO only whitelists a few.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds

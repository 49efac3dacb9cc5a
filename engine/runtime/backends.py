"""Training backends: DistributedDataParallel and DeepSpeed behind one small interface.

A stage never branches on the backend. It builds its model and an optimizer factory,
calls :func:`build_backend` with the ``distributed`` config section and the run's
:class:`~engine.runtime.precision.Precision`, and then only uses::

    out = backend.forward(x)                 # under the configured autocast
    outs = backend.forward_each([x1, x2])    # several forwards, one graph (MixMatch interleave)
    backend.zero_grad(); backend.backward(loss); backend.step()
    backend.set_lr(lr); backend.train(); backend.eval()
    with backend.autocast(): ...             # e.g. evaluation through backend.module
    backend.save(dir) / backend.load(dir)    # via engine.runtime.checkpoint, on every rank

``backend.module`` is always the plain, unwrapped model (its state dict has the stage's
own keys); ``backend.model`` is what actually runs (DDP, DeepSpeed engine, compiled).
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from engine.errors import UserError
from engine.runtime.syncbn import convert_sync_batchnorm, needs_conversion

from engine.runtime.precision import DTYPES, Precision, autocast_context

_DTYPES = {k: v for k, v in DTYPES.items() if k != "fp32"}
TRAIN_STATE = "train_state.pt"
DS_TAG = "deepspeed"
DS_SCALER = "deepspeed_grad_scaler.pt"


class _Each(nn.Module):
    """Lets one wrapped forward call run the model on several inputs.

    DDP (and DeepSpeed) expect one forward per backward; MixMatch runs the model on
    several interleaved batches so that each BatchNorm batch mixes labelled and
    unlabelled samples. Routing all of them through a single wrapper call keeps both.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args: Any, _each: bool = False, **kwargs: Any) -> Any:
        if _each:
            return [self.module(x, **kwargs) for x in args[0]]
        return self.module(*args, **kwargs)


class TrainBackend(abc.ABC):
    name = "base"

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, distributed, precision: Precision, dist):
        self.module = module
        self.optimizer = optimizer
        self.distributed = distributed  # the config's ``distributed`` section
        self.precision = precision
        self.dist = dist
        self.device = dist.device
        self.model: Callable = module

    # ---- precision
    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ---- the step
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.autocast():
            return self.model(*args, **kwargs)

    def forward_each(self, inputs: Sequence[torch.Tensor], **kwargs: Any) -> list:
        with self.autocast():
            return self.model(list(inputs), _each=True, **kwargs)

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        ...

    @abc.abstractmethod
    def step(self) -> None:
        ...

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        # A group may carry "lr_scale" (e.g. a smaller rate for a pretrained backbone).
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def loss_scale(self) -> float:
        return 1.0

    def train(self, mode: bool = True) -> None:
        # The wrappers (DDP, compiled module) carry their own flag; it propagates down.
        (self.model if isinstance(self.model, nn.Module) else self.module).train(mode)

    def eval(self) -> None:
        self.train(False)

    # ---- checkpoints: called on every rank with the same (shared) directory
    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        ...

    @abc.abstractmethod
    def load(self, directory: Path) -> None:
        ...


# --------------------------------------------------------------------------- DDP


class DDPBackend(TrainBackend):
    name = "ddp"

    def __init__(self, module, make_optimizer, distributed, precision: Precision, dist, *, sync_bn: bool,
                 find_unused_parameters: bool):
        module = module.to(dist.device)
        if distributed.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if sync_bn and needs_conversion(dist.device, dist.world_size):
            module = convert_sync_batchnorm(module, dist.device)
        optimizer = make_optimizer(module.parameters())
        super().__init__(module, optimizer, distributed, precision, dist)
        wrapped: nn.Module = _Each(module)
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Synchronised BatchNorm already keeps buffers equal; otherwise rank 0's
            # running statistics are broadcast each step (DDP's default).
            with warnings.catch_warnings():
                # torch 2.14 deprecates broadcast_buffers, but its replacement still
                # syncs at construction; the behaviour wanted here is the old one.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                wrapped = DDP(wrapped, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
                              broadcast_buffers=not sync_bn, find_unused_parameters=find_unused_parameters,
                              gradient_as_bucket_view=True)
        if distributed.compile:
            wrapped = torch.compile(wrapped, mode=distributed.compile_mode)
        self.model = wrapped
        self.scaler = precision.grad_scaler(dist.device)
        self.clip = float(distributed.grad_clip)

    def autocast(self):
        return self.precision.autocast(self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        if self.scaler is not None:
            if self.clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.optimizer.step()

    @property
    def loss_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save(self, directory: Path) -> None:
        # DDP keeps every rank's replica identical: one copy, written by rank 0.
        if self.dist.is_main:
            from engine.fsutil import torch_save

            torch_save(Path(directory) / TRAIN_STATE, self.state_dict())

    def load(self, directory: Path) -> None:
        state = torch.load(Path(directory) / TRAIN_STATE, map_location=self.device, weights_only=True)
        self.load_state_dict(state)


# --------------------------------------------------------------------------- DeepSpeed


def _cast_to_own_dtype(module: nn.Module, args: tuple) -> tuple | None:
    # A forward pre-hook: floating inputs take the dtype of the module's own parameters.
    p = next(module.parameters(recurse=False), None)
    if p is None or not p.is_floating_point():
        return None
    if not any(torch.is_tensor(a) and a.is_floating_point() and a.dtype != p.dtype for a in args):
        return None
    return tuple(a.to(p.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def cast_inputs_to_parameters(module: nn.Module) -> int:
    """Make every submodule that holds parameters cast its floating inputs to their dtype.

    DeepSpeed's own bf16/fp16 modes convert the whole model to 16 bits, and a model that
    upcasts on purpose (the linear stage's frozen-backbone features, a head fed fp32)
    then hands fp32 to 16-bit weights: "expected scalar type Half but found Float". The
    hooks fix that at the one boundary where DeepSpeed owns precision, for every stage.
    A module-level function, so a deep copy of the model (MixMatch's EMA) keeps working
    hooks. Returns the number of modules hooked."""
    hooked = 0
    for m in module.modules():
        if next(m.parameters(recurse=False), None) is not None:
            m.register_forward_pre_hook(_cast_to_own_dtype)
            hooked += 1
    return hooked


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
        shipped = Path(__file__).resolve().parents[2] / p
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


class DeepSpeedBackend(TrainBackend):
    name = "deepspeed"

    def __init__(self, module, make_optimizer, distributed, precision: Precision, dist, *, sync_bn: bool,
                 per_rank_batch: int):
        import deepspeed

        # Weights stay contiguous: DeepSpeed broadcasts and flattens parameters through
        # byte views, which channels_last conv weights do not allow. The inputs are still
        # channels_last, and cuDNN picks the NHWC kernels from them.
        module = module.to(dist.device)
        if sync_bn and needs_conversion(dist.device, dist.world_size):
            module = convert_sync_batchnorm(module, dist.device)
        optimizer = make_optimizer(module.parameters())
        ds = resolve_ds_config(distributed, precision.name, per_rank_batch=per_rank_batch, world_size=dist.world_size,
                               per_layer_optimizer=getattr(optimizer, "per_layer", False))
        self.ds_config = ds
        self.native_dtype = next((_DTYPES[p] for p in ("bf16", "fp16")
                                  if isinstance(ds.get(p), dict) and ds[p].get("enabled", False)), None)
        auto = ds.get("torch_autocast", {})
        self.autocast_dtype = _DTYPES[ds_precision(ds)] if auto.get("enabled", False) else None
        super().__init__(module, optimizer, distributed, precision, dist)
        if self.native_dtype is not None:
            cast_inputs_to_parameters(module)
        engine, ds_optimizer, _, _ = deepspeed.initialize(args=deepspeed_args(dist), model=_Each(module),
                                                          optimizer=optimizer, config=ds, dist_init_required=False)
        self.engine = engine
        self.ds_optimizer = ds_optimizer
        self.model = engine
        if distributed.compile:
            engine.compile(compile_kwargs={"mode": distributed.compile_mode})

    def autocast(self):
        return autocast_context(self.device, self.autocast_dtype)

    def _cast(self, x: Any) -> Any:
        # DeepSpeed's own bf16/fp16 modes convert the weights and expect matching inputs.
        if self.native_dtype is not None and torch.is_tensor(x) and x.is_floating_point():
            return x.to(self.native_dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(v) for v in x)
        return x

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.engine(*self._cast(args), **kwargs)  # the engine applies torch_autocast itself

    def forward_each(self, inputs: Sequence[torch.Tensor], **kwargs: Any) -> list:
        return self.engine(self._cast(list(inputs)), _each=True, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def loss_scale(self) -> float:
        scaler = getattr(self.engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None:
            return float(scaler.get_scale())
        return float(getattr(self.ds_optimizer, "cur_scale", getattr(self.ds_optimizer, "loss_scale", 1.0)) or 1.0)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def eval(self) -> None:
        self.engine.eval()

    def _autocast_scaler(self):
        return getattr(self.engine, "torch_autocast_z0_gradscaler", None)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, save_latest=False)
        # DeepSpeed's checkpoint leaves out the GradScaler of its torch-autocast fp16 mode;
        # without it a resumed run would restart the loss scale from 2**16.
        scaler = self._autocast_scaler()
        if scaler is not None and self.dist.is_main:
            from engine.fsutil import torch_save

            torch_save(Path(directory) / DS_SCALER, scaler.state_dict())

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {directory}/{DS_TAG}")
        scaler = self._autocast_scaler()
        if scaler is not None:
            scaler.load_state_dict(torch.load(Path(directory) / DS_SCALER, weights_only=True))


# --------------------------------------------------------------------------- factory


def build_backend(model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                  distributed, precision: Precision, dist, *, sync_bn: bool, per_rank_batch: int = 0,
                  find_unused_parameters: bool = False) -> TrainBackend:
    """Wrap ``model`` for training on ``dist.device`` with ``distributed.backend``.

    ``make_optimizer`` receives the final parameters (after device placement and any
    SyncBatchNorm conversion). ``per_rank_batch`` is required by DeepSpeed (its config
    states the batch); ``sync_bn`` applies only with more than one process.
    """
    name = distributed.backend
    if name == "ddp":
        return DDPBackend(model, make_optimizer, distributed, precision, dist, sync_bn=sync_bn,
                          find_unused_parameters=find_unused_parameters)
    if name == "deepspeed":
        if per_rank_batch < 1:
            raise ValueError("build_backend: the deepspeed backend needs per_rank_batch")
        return DeepSpeedBackend(model, make_optimizer, distributed, precision, dist, sync_bn=sync_bn,
                                per_rank_batch=per_rank_batch)
    raise UserError(f"config: distributed.backend {name!r} is unknown: must be ddp or deepspeed")


def check_backend(distributed, precision: str, world_size: int, *, per_rank_batch: int,
                  per_layer_optimizer: bool) -> None:
    """What can fail about the backend on the config alone, before any work (preflight)."""
    if distributed.backend not in ("ddp", "deepspeed"):
        raise UserError(f"config: distributed.backend {distributed.backend!r} is unknown: must be ddp or deepspeed")
    if distributed.backend == "deepspeed":
        resolve_ds_config(distributed, precision, per_rank_batch=per_rank_batch, world_size=world_size,
                          per_layer_optimizer=per_layer_optimizer)

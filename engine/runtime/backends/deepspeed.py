"""DeepSpeed: ZeRO and its own 16-bit modes, or torch autocast under ZeRO-0."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from engine.runtime.backends.base import TrainBackend, _Each
from engine.runtime.backends.ds_config import deepspeed_args, ds_precision, resolve_ds_config
from engine.runtime.precision import DTYPES, Precision, autocast_context
from engine.runtime.syncbn import convert_sync_batchnorm, needs_conversion

_DTYPES = {k: v for k, v in DTYPES.items() if k != "fp32"}
DS_TAG = "deepspeed"
DS_SCALER = "deepspeed_grad_scaler.pt"


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


class DeepSpeedBackend(TrainBackend):
    name = "deepspeed"
    needs_process_group = True

    @classmethod
    def preflight(cls, distributed, precision: str, world_size: int, *, per_rank_batch: int,
                  per_layer_optimizer: bool) -> None:
        from engine.runtime.backends.ds_config import resolve_ds_config

        resolve_ds_config(distributed, precision, per_rank_batch=per_rank_batch, world_size=world_size,
                          per_layer_optimizer=per_layer_optimizer)

    def __init__(self, module, make_optimizer, distributed, precision: Precision, dist, *, sync_bn: bool,
                 per_rank_batch: int, find_unused_parameters: bool = False):
        import deepspeed

        if per_rank_batch < 1:  # its config states the batch
            raise ValueError("the deepspeed backend needs per_rank_batch")
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

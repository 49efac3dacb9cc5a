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

The package: ``base`` (the interface), ``ddp``, ``deepspeed`` and ``ds_config`` (a
DeepSpeed JSON resolved against the run's config); the factory is here.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from engine.runtime.backends.base import ENGINES, TRAIN_STATE, TrainBackend
from engine.runtime.backends.ddp import DDPBackend
from engine.runtime.backends.deepspeed import DeepSpeedBackend, cast_inputs_to_parameters
from engine.runtime.backends.ds_config import deepspeed_args, ds_precision, load_ds_config, resolve_ds_config
from engine.runtime.precision import Precision

__all__ = ["ENGINES", "TRAIN_STATE", "DDPBackend", "DeepSpeedBackend", "TrainBackend", "build_backend",
           "cast_inputs_to_parameters", "check_backend", "deepspeed_args", "ds_precision", "load_ds_config",
           "resolve_ds_config"]


def build_backend(model: nn.Module, make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                  distributed, precision: Precision, dist, *, sync_bn: bool, per_rank_batch: int = 0,
                  find_unused_parameters: bool = False) -> TrainBackend:
    """Wrap ``model`` for training on ``dist.device`` with ``distributed.engine``.

    ``make_optimizer`` receives the final parameters (after device placement and any
    SyncBatchNorm conversion). ``per_rank_batch`` is required by DeepSpeed (its config
    states the batch); ``sync_bn`` applies only with more than one process.
    """
    backend = ENGINES.lookup(distributed.engine, "distributed.engine")
    return backend(model, make_optimizer, distributed, precision, dist, sync_bn=sync_bn,
                   per_rank_batch=per_rank_batch, find_unused_parameters=find_unused_parameters)


def check_backend(distributed, precision: str, world_size: int, *, per_rank_batch: int,
                  per_layer_optimizer: bool) -> None:
    """What can fail about the backend on the config alone, before any work (preflight)."""
    ENGINES.lookup(distributed.engine, "distributed.engine").preflight(
        distributed, precision, world_size, per_rank_batch=per_rank_batch, per_layer_optimizer=per_layer_optimizer)

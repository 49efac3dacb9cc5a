"""DistributedDataParallel (one process: the plain module), with autocast and the
gradient scaler of the run's precision."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from engine.runtime.backends.base import TRAIN_STATE, TrainBackend, _Each
from engine.runtime.precision import Precision
from engine.runtime.syncbn import convert_sync_batchnorm, needs_conversion


class DDPBackend(TrainBackend):
    name = "ddp"

    def __init__(self, module, make_optimizer, distributed, precision: Precision, dist, *, sync_bn: bool,
                 find_unused_parameters: bool, per_rank_batch: int = 0):
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

"""The interface every training backend implements (see the package's docstring)."""
from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from engine.registry import Registered, Registry
from engine.runtime.precision import Precision

TRAIN_STATE = "train_state.pt"
# distributed.engine's values: each TrainBackend subclass with a ``name`` registers here.
ENGINES: Registry = Registry("training engine")


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


class TrainBackend(Registered, abc.ABC):
    """What a stage trains through. A subclass sets ``name`` (its ``distributed.engine``
    value) and is built by ``build_backend`` with the keyword arguments of ``BUILD_ARGS``."""

    registry = ENGINES
    # Whether even one process needs torch.distributed's process group (DeepSpeed's
    # engine always talks through it).
    needs_process_group: bool = False

    @classmethod
    def preflight(cls, distributed, precision: str, world_size: int, *, per_rank_batch: int,
                  per_layer_optimizer: bool) -> None:
        """What can fail on the config alone, checked before any work (the default: nothing)."""

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

"""The shape the classifier stages share (the baseline, DBD's linear stage, ablations)."""
from __future__ import annotations

import abc

import torch

from engine.runtime.batching import steps_per_epoch
from engine.stages.base import Stage
from engine.stages.views import WeakAugment


class ClassifierStage(Stage):
    """A classifier trained on labelled batches with weak views: one step is view,
    forward, ``loss(logits, labels)``, backward, update. Subclasses say which model,
    optimizer, loss and loader."""

    def train_on_whole_set(self, batching, view, iterations_per_epoch: int) -> None:
        """The whole (poisoned) training set with weak views, one pass per epoch (capped at
        ``iterations_per_epoch`` steps when > 0): the baseline's and the linear stage's data."""
        env = self.env
        self.loader = env.data.train_loader(batching.per_rank)
        self.augment = WeakAugment(env.data.config, view)
        self.epochs = self.config.epochs
        self.steps_per_epoch = steps_per_epoch(env.data.meta.train_count, batching, iterations_per_epoch)
        self.images_per_step = batching.global_batch

    def prepare(self, batch, epoch: int, step: int):
        images, labels, _ = batch
        dev = self.env.dist.device
        x = self.augment(images.to(dev, non_blocking=True), seed=self.env.seed, epoch=epoch, step=step,
                         rank=self.env.dist.rank)
        return x, labels.to(dev, non_blocking=True)

    def update(self, inputs, epoch: int, step: int) -> dict:
        x, y = inputs
        logits = self.backend.forward(x)
        loss = self.loss(logits.float(), y)
        self.backend.zero_grad()
        self.backend.backward(loss)
        self.backend.step()
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}

    @abc.abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of fp32 logits against the (possibly poisoned) labels."""

    def batches(self, epoch: int):
        return self.env.data.epoch(self.loader, epoch)

"""DBD's split: per-sample SCE loss, the lowest ``epsilon`` fraction keeps its label.

The loss pass runs with the model in eval mode on the training set with training
augmentation (dbd.md). It is distributed without changing the result: the sorted
index list is cut into fixed global batches, batch k goes to rank k mod W, and the
augmentation of batch k is seeded by k alone, so every world size scores every sample
with the same view; losses are then gathered by index on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.data.run_data import EVAL_BATCH
from engine.losses.sce import symmetric_cross_entropy

SPLIT_BATCH = EVAL_BATCH


@dataclass
class Split:
    labelled: np.ndarray  # dataset indices, sorted
    unlabelled: np.ndarray
    losses: np.ndarray  # per training sample, by index

    def quality(self, poisoned: np.ndarray) -> dict:
        """Split quality as a poison detector (the unlabelled part is the 'detected' set)."""
        p_l = int(poisoned[self.labelled].sum())
        p_u = int(poisoned[self.unlabelled].sum())
        total_p = p_l + p_u
        pct = lambda a, b: 100.0 * a / b if b else 0.0  # noqa: E731
        return {"labelled": int(len(self.labelled)), "unlabelled": int(len(self.unlabelled)),
                "poisoned_labelled": p_l,
                "labelled_poison_share": pct(p_l, len(self.labelled)),
                "poisoned_in_labelled": pct(p_l, total_p),
                "precision": pct(p_u, len(self.unlabelled)), "recall": pct(p_u, total_p)}


def select_lowest(losses: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``int(epsilon * N)`` lowest losses; ties go to the lower index."""
    n = len(losses)
    order = np.lexsort((np.arange(n), losses))
    k = int(epsilon * n)
    return np.sort(order[:k]), np.sort(order[k:])


def rank_batches(n: int, rank: int, world_size: int, batch: int = SPLIT_BATCH) -> tuple[np.ndarray, list[int]]:
    """Indices rank ``rank`` scores and the global batch numbers they form."""
    ks = list(range(rank, -(-n // batch), world_size))
    if not ks:
        return np.zeros(0, dtype=np.int64), []
    idx = np.concatenate([np.arange(k * batch, min((k + 1) * batch, n)) for k in ks])
    return idx, ks


def split_loader(data):
    """This rank's loader for the loss pass (None if it scores nothing). Its subset is
    the same every epoch, so the fine-tuning stage builds it once and reuses it."""
    idx, _ = rank_batches(len(data.train_labels()), data.dist.rank, data.dist.world_size)
    if not len(idx):
        return None
    return data.scoring_loader(idx)


@torch.no_grad()
def per_sample_losses(data, precision, module: torch.nn.Module, augment, epoch: int, labels: np.ndarray,
                      alpha: float, beta: float, loader=None) -> np.ndarray:
    dist = data.dist
    n = len(labels)
    idx, ks = rank_batches(n, dist.rank, dist.world_size)
    dev = dist.device
    # Filled on the device and copied to the host once: a per-batch copy would make
    # every batch wait for the model.
    local = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
    if len(idx):
        loader = loader if loader is not None else split_loader(data)
        was_training = module.training
        module.eval()
        for (images, y, indices), k in zip(loader, ks):
            # Seeded by the global batch number alone, so every world size draws the same views.
            x = augment(images.to(dev, non_blocking=True), seed=data.seed, epoch=epoch, step=k, rank=0,
                        purpose="split_view")
            with precision.autocast(dev):
                logits = module(x)
            loss = symmetric_cross_entropy(logits.float(), y.to(dev, non_blocking=True), alpha, beta, reduction="none")
            local[indices.to(dev, non_blocking=True)] = loss.double()
        module.train(was_training)
    local = local.cpu()
    if dist.world_size > 1:
        # Each sample is scored by exactly one rank; NaN elsewhere. Summing after
        # zeroing the NaNs assembles the full vector on every rank.
        mask = dist.all_reduce_sum((~torch.isnan(local)).double())
        local = dist.all_reduce_sum(torch.nan_to_num(local, nan=0.0))
        if not torch.all(mask == 1):
            raise RuntimeError("split: some training samples were scored by no rank or by two")
    return local.numpy()


def compute_split(data, precision, module, augment, epoch: int, epsilon: float, alpha: float, beta: float,
                  loader=None) -> Split:
    labels = data.train_labels()
    losses = per_sample_losses(data, precision, module, augment, epoch, labels, alpha, beta, loader=loader)
    labelled, unlabelled = select_lowest(losses, epsilon)
    return Split(labelled=labelled, unlabelled=unlabelled, losses=losses)


class EpochSplit:
    """The split a stage re-computes at the start of every epoch, with its checkpoint state.

    ``at(epoch, module)`` scores every training sample with ``module`` (once per epoch:
    a mid-epoch resume restores the epoch's split from ``state_dict`` instead of
    re-scoring with the partly trained model), logs its quality as a poison detector,
    and returns the labelled indices. The loss pass's loader is built at the first call.
    """

    def __init__(self, data, precision, augment, *, epsilon: float, alpha: float, beta: float, metrics, name: str):
        self.data, self.precision, self.augment = data, precision, augment
        self.epsilon, self.alpha, self.beta = epsilon, alpha, beta
        self.metrics, self.name = metrics, name
        self.poisoned = data.poisoned_mask()
        self.epoch = -1
        self.labelled: torch.Tensor | None = None
        self._loader = None

    def at(self, epoch: int, module: torch.nn.Module) -> np.ndarray:
        if self.epoch != epoch:
            if self._loader is None:
                self._loader = split_loader(self.data)
            split = compute_split(self.data, self.precision, module, self.augment, epoch, self.epsilon, self.alpha,
                                  self.beta, loader=self._loader)
            self.epoch, self.labelled = epoch, torch.from_numpy(split.labelled)
            quality = split.quality(self.poisoned)
            if self.data.dist.is_main:
                self.metrics.log("split", epoch=epoch, **quality)
                print(f"[{self.name}] epoch {epoch}: labelled {quality['labelled']}, poisoned share of labelled "
                      f"{quality['labelled_poison_share']:.2f}%, detector recall {quality['recall']:.1f}%", flush=True)
        return self.labelled.numpy()

    def unlabelled(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.poisoned)), self.labelled.numpy())

    def state_dict(self) -> dict:
        return {"split_epoch": self.epoch, "labelled": self.labelled}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("split_epoch", -1))
        self.labelled = state.get("labelled")

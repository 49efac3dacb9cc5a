"""One seed stream for every random draw of a run.

A draw is named by its purpose ("train_view", "mixup", "order/train", ...) and its
position (epoch, step, rank). Each field is folded through ``kernels.mix_seed``'s
splitmix64 chain, so two different tuples give unrelated streams: no scheme of the
form ``seed * 1000 + salt`` (where seed s with salt 7919 equals seed s + 7 with salt
919) and no offsets added to the seed. The same tuple gives the same stream in every
process, on every launcher and after a resume, which is what makes runs on 1 and on N
processes follow the same trajectory and a resumed run repeat the interrupted one.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def purpose_id(purpose: str) -> int:
    """A fixed 56-bit number for a purpose name (stable across processes and versions)."""
    if not purpose:
        raise ValueError("a seed stream needs a purpose")
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:7], "big")


def stream_seed(seed: int, purpose: str, epoch: int = 0, step: int = 0, rank: int = 0) -> int:
    """The 63-bit seed of draw ``(seed, purpose, epoch, step, rank)``."""
    from kernels import mix_seed

    return mix_seed(mix_seed(int(seed), purpose_id(purpose), 0, 0), int(epoch), int(step), int(rank))


def seed_stream(seed: int, purpose: str, epoch: int = 0, step: int = 0, rank: int = 0,
                device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on ``device`` for draw ``(seed, purpose, epoch, step, rank)``."""
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(stream_seed(seed, purpose, epoch, step, rank))
    return g


def numpy_stream(seed: int, purpose: str, epoch: int = 0, step: int = 0, rank: int = 0) -> np.random.Generator:
    """The NumPy generator of the same draw."""
    return np.random.default_rng(stream_seed(seed, purpose, epoch, step, rank))

"""Atomic, resumable checkpoints for both backends.

Layout under ``<stage_dir>/checkpoints/``, one folder per position, named so that
lexicographic order is training order::

    e00003-s0000120/
        train_state.pt      model + optimizer + grad scaler (DDP; rank 0 writes it)
        deepspeed/          DeepSpeed's own save_checkpoint, written by every rank
        rng-rank<R>.pt      each rank's torch / CUDA / numpy / python RNG states
        stage.pt            the stage's own state (loader position, ramps, history)
        meta.json           written last, by rank 0, after every rank has finished

``meta.json`` is the commit marker: a folder without it (a kill during the save) is
never loaded and is removed by the next save. Every file is written to a temporary
name, fsynced and renamed (engine.fsutil), so a reader never sees half a file. The
newest complete checkpoint and the one before it are kept. Everything we read back
goes through ``torch.load(weights_only=True)``: stage state must therefore be made of
tensors, numbers, strings, lists, tuples and dicts. The folder is assumed to be on a
filesystem every rank sees (as DeepSpeed's own checkpoints assume).
"""
from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import UserError
from engine.fsutil import torch_save, write_json
from engine.runtime import launch

META = "meta.json"
STAGE = "stage.pt"
KEEP = 2


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def get_rng_state(device: torch.device) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        # numpy and python states are converted to tensors and plain numbers so that
        # weights_only loading accepts them.
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _name(epoch: int, step: int) -> str:
    return f"e{epoch:05d}-s{step:07d}"


def _is_ckpt(p: Path) -> bool:
    return p.is_dir() and p.name.startswith("e") and "-s" in p.name and not p.name.startswith(".")


def _broadcast(obj: Any) -> Any:
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj


class Checkpointer:
    """Save and restore one stage's training state; all methods are called on every rank."""

    def __init__(self, stage_dir: str | Path, backend, dist):
        self.root = Path(stage_dir) / "checkpoints"
        self.backend = backend
        self.dist = dist

    # ---- save
    def save(self, epoch: int, step: int, stage_state: dict) -> Path:
        """Checkpoint the position "epoch ``epoch``, ``step`` steps done" (collective)."""
        d = self.root / _name(epoch, step)
        if self.dist.is_main:
            if d.exists():  # a leftover of an interrupted save at this same position
                shutil.rmtree(d)
            d.mkdir(parents=True)
        launch.barrier()
        self.backend.save(d)
        torch_save(d / _rng_file(self.dist.rank), get_rng_state(self.dist.device))
        if self.dist.is_main:
            torch_save(d / STAGE, stage_state)
        launch.barrier()
        if self.dist.is_main:
            write_json(d / META, {"epoch": int(epoch), "step": int(step), "backend": self.backend.name,
                                  "world_size": int(self.dist.world_size), "time": round(time.time(), 3)})
            self._prune()
        return d

    def _prune(self) -> None:
        if not self.root.is_dir():
            return
        dirs = sorted((p for p in self.root.iterdir() if _is_ckpt(p)), key=lambda p: p.name)
        complete = [p for p in dirs if (p / META).is_file()]
        keep = set(complete[-KEEP:])
        newest = complete[-1].name if complete else ""
        for p in dirs:
            # Incomplete folders newer than the newest complete one cannot exist here
            # (saves are sequential); older ones are interrupted saves.
            if p not in keep and (p in complete or p.name < newest):
                shutil.rmtree(p, ignore_errors=True)

    # ---- load
    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _is_ckpt(p) and (p / META).is_file()),
                      key=lambda p: p.name, reverse=True)

    def load_latest(self) -> dict | None:
        """Restore the newest complete checkpoint (falling back to the previous one).

        Returns ``{"epoch", "step", "stage_state", "rng", "path"}`` or None when there is
        none. Model, optimizer, loss scaler and this rank's RNG states are restored.
        """
        names = _broadcast([p.name for p in self.complete()] if self.dist.is_main else None)
        for name in names:
            d = self.root / name
            meta = json.loads((d / META).read_text())
            self._check_compatible(meta, d)
            try:
                self.backend.load(d)
                stage_state = torch.load(d / STAGE, map_location="cpu", weights_only=True)
                rng_path = d / _rng_file(self.dist.rank)
                rng = torch.load(rng_path, map_location="cpu", weights_only=True) if rng_path.is_file() else None
                ok = True
            except Exception as e:  # noqa: BLE001 - any unreadable file means: use the previous one
                if isinstance(e, UserError):
                    raise
                print(f"[rank {self.dist.rank}] checkpoint {d} unreadable ({type(e).__name__}: {e}); "
                      f"trying the previous one", flush=True)
                ok = False
            if not self.dist.all_true(ok):
                continue
            if rng is not None:
                set_rng_state(rng, self.dist.device)
            return {"epoch": int(meta["epoch"]), "step": int(meta["step"]), "stage_state": stage_state,
                    "rng": rng, "path": d}
        return None

    def _check_compatible(self, meta: dict, d: Path) -> None:
        if meta.get("backend") != self.backend.name:
            raise UserError(f"checkpoint {d} was written by the {meta.get('backend')} backend but this run uses "
                            f"{self.backend.name}: resume with distributed.engine={meta.get('backend')} "
                            f"or use a new run_dir")
        ws = int(meta.get("world_size", self.dist.world_size))
        if ws != self.dist.world_size and self.backend.name == "deepspeed":
            raise UserError(f"checkpoint {d} was written by {ws} DeepSpeed processes, this run has "
                            f"{self.dist.world_size}: resume with {ws} processes or use a new run_dir")


def save_final_model(path: str | Path, module: torch.nn.Module) -> Path:
    """The unwrapped model's state dict, fp32, CPU, atomically (call on rank 0 only)."""
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu()
        if v.is_floating_point() and v.dtype != torch.float32:
            v = v.float()  # a DeepSpeed native bf16/fp16 run keeps 16-bit weights
        state[k] = v.contiguous()
    torch_save(path, state)
    return Path(path)

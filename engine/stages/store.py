"""A shared store of stages, keyed by what each depends on (``stage_store`` in the config).

With a store, each stage of a run trains in ``<store>/<stage>-<key>/`` and the run's
``<run_dir>/<stage>`` is a relative symlink to it. ``<key>`` is the hash of exactly
what the stage depends on (engine.stages.keys), so another run whose stage has the
same key (an epsilon ablation's SimCLR, the no-defense baseline of every defense cell)
finds it complete and reuses it, and a run whose key differs trains its own. An
interrupted stage resumes in the store, whichever run asked for it next.

Each entry holds ``key.json`` (the dependency values, readable), the stage's own files,
and ``metrics.jsonl`` with the stage's records; a run that reuses the entry copies those
records into its own ``metrics.jsonl`` so its report has the curves and the split.
While a stage trains, rank 0 holds an exclusive ``flock`` on ``<entry>/.lock``: a second
job asking for the same entry at the same time fails at once with one clear error
instead of writing into it (``dbd sweep --slurm`` orders cells so this does not happen).

An entry is reused only when it checks out (engine.stages.integrity): its ``done.json``
reads back and every file it records has its recorded size and sha256. Rank 0 checks
under the lock and every rank takes its answer. A damaged entry (a torn ``done.json``,
a truncated, changed or missing ``model.pt``...) gets one warning line naming it and
what is wrong, its files are moved into ``<entry>/.damaged-<time>/`` (kept, not
deleted; ``.lock`` and ``key.json`` stay), and the stage is retrained from scratch in
the same entry, checkpoints included in what moved, so nothing of the damaged state is
resumed. An entry finished before checksums were recorded is reused with one warning
that it cannot be verified. A store root that is a file, or one that cannot be
created or written, is one clear error when the first stage attaches.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from engine.errors import UserError
from engine.fsutil import write_json
from engine.report.metrics import read_metrics
from engine.rundir import METRICS
from engine.runtime import launch
from engine.stages.integrity import check_finished
from engine.stages.keys import dependencies, digest

KEY = "key.json"
LOCK = ".lock"
KEY_CHARS = 16  # of the sha256: collisions are not a concern at grid sizes


class StageStore:
    def __init__(self, root: str | Path, cfg: dict, *, dataset_hash: str, world_size: int,
                 device_type: str | None = None):
        self.root = Path(root)
        self.cfg = cfg  # the run's config as a plain dict (engine.settings.to_dict)
        self.dataset_hash = dataset_hash
        self.world_size = world_size
        self.device_type = device_type  # cpu | cuda; None: the config's device, resolved here

    def dependencies(self, stage: str) -> dict:
        return dependencies(self.cfg, stage, dataset_hash=self.dataset_hash, world_size=self.world_size,
                            device_type=self.device_type)

    def entry(self, stage: str) -> Path:
        return self.root / f"{stage}-{digest(self.dependencies(stage))[:KEY_CHARS]}"

    @contextlib.contextmanager
    def attach(self, stage: str, run_dir: Path, dist) -> Iterator[bool]:
        """Point ``run_dir/stage`` at the stage's entry and hold its lock while the body
        runs (every rank enters; rank 0 does the work). Yields whether the entry is
        already complete and intact (a damaged one has been set aside by then, see the
        module docstring). A real (non-link) ``run_dir/stage`` from a run without a
        store is left alone and used as it is, verified the same way."""
        link = Path(run_dir) / stage
        entry = self.entry(stage)
        lock_fd = None
        problem = ""
        complete = False
        if dist.is_main:
            try:
                lock_fd, problem = self._prepare(stage, link, entry)
                if not problem:
                    complete = self._check(stage, link, entry)
            except OSError as e:
                problem = f"stage store {self.root}: {e}"
        ok = dist.all_true(not problem)
        if not ok:
            if lock_fd is not None:
                os.close(lock_fd)
            raise UserError(problem or f"stage {stage!r}: rank 0 could not attach the stage store {self.root}")
        # Rank 0's verdict for every rank (the others pass True): one hash, one answer.
        complete = dist.all_true(complete or not dist.is_main)
        launch.barrier()  # the link exists before any rank looks at the stage folder
        try:
            yield complete
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the flock

    @staticmethod
    def _check(stage: str, link: Path, entry: Path) -> bool:
        """Rank 0, under the lock: whether the stage behind ``link`` may be reused."""
        if link.is_symlink():
            where = f"stage-store entry {entry}"
        else:
            where = f"stage folder {link}"
        complete = check_finished(stage, link, where)
        if complete and link.is_symlink():
            print(f"[{stage}] complete in the stage store ({entry}), reused", flush=True)
        return complete

    def _check_root(self) -> str:
        """Why the store root cannot hold entries, or "" (a clear line, not an OSError later)."""
        root = self.root
        if root.exists() and not root.is_dir():
            return (f"config: stage_store {root} is a file, not a folder: "
                    f"point it at a folder (it is created if missing)")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"config: stage_store {root} cannot be created ({e.strerror or e})"
        if not os.access(root, os.W_OK | os.X_OK):
            return f"config: stage_store {root} is not writable by this user"
        return ""

    def _prepare(self, stage: str, link: Path, entry: Path) -> tuple[int | None, str]:
        if link.exists() and not link.is_symlink():
            print(f"[{stage}] {link} is a folder of its own (made without a stage store): used as it is", flush=True)
            return None, ""
        problem = self._check_root()
        if problem:
            return None, problem
        entry.mkdir(parents=True, exist_ok=True)
        if not (entry / KEY).is_file():
            write_json(entry / KEY, self.dependencies(stage))
        fd = os.open(entry / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None, (f"stage {stage!r}: its stage-store entry {entry} is being trained by another job "
                          f"right now (lock {entry / LOCK}); run this one after it finishes")
        target = os.path.relpath(entry, link.parent)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and os.readlink(link) != target:
            # The run's config changed what this stage depends on: point at the new entry.
            print(f"[{stage}] its inputs changed since this run dir last ran it: now {entry.name}", flush=True)
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
        return fd, ""

    @staticmethod
    def copy_records(stage: str, run_dir: Path) -> None:
        """Rank 0: the reused entry's metrics records into this run's metrics.jsonl, once."""
        own = Path(run_dir) / METRICS
        if any(r.get("stage") == stage for r in read_metrics(own)):
            return
        records = read_metrics(Path(run_dir) / stage / METRICS)
        if records:
            with open(own, "a") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())

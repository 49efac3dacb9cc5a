"""Checksums of a finished stage's files: recorded in its ``done.json``, verified before reuse.

A finished stage is reused without a second look (a run dir's complete stage is
skipped, a stage-store entry is shared by every run whose stage has its key), so a
``model.pt`` cut short by a full disk, a flipped byte on a bad drive, or a
``done.json`` torn by a copy would otherwise flow silently into every downstream stage
and every cell of a sweep. The Trainer therefore records, in ``done.json``::

    "files": {"model.pt": {"bytes": N, "sha256": "..."}, "features.npz": {...}, ...}

one entry per file the stage wrote in its folder (paths relative to it, with ``/``),
and ``check_finished`` verifies them before a stage is reused (rank 0 only; the callers
make every rank agree on its answer).

Not recorded, because they legitimately change after ``done.json`` is written or are
not the stage's result:

- ``done.json`` itself (it holds the record);
- ``metrics.jsonl``: a stage-store entry's copy of its records, appended to after
  ``done.json`` (the ``stage_done`` record follows it);
- ``key.json``: written by the store (engine.stages.store) and rewritten when missing;
- ``checkpoints/``: resume state, pruned by the Checkpointer, never read on reuse (and
  hashing it would double the cost of the record);
- every name starting with ``.``: the store's ``.lock``, atomic writes' temporary
  files, fault-injection markers, and the ``.damaged-*`` folders made here.

A damaged stage is set aside, not deleted: every file but ``.lock`` and ``key.json``
moves into ``<stage_dir>/.damaged-<UTC time>/`` (one rename each, so nothing is copied,
and the evidence is kept for whoever wants to know what broke; delete it when done).
``done.json`` moves last, so a crash half way leaves a ``done.json`` that fails the
check again rather than a half-emptied folder that looks complete, and ``checkpoints/``
moves too, so the stage is retrained from scratch instead of resumed from state of the
same damaged run. A ``done.json`` without ``files`` (written before checksums existed)
is reused with a warning that it cannot be verified.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from engine.fsutil import sha256_file
from engine.rundir import DONE, METRICS

FILES = "files"  # the key of the record in done.json
KEPT = (".lock", "key.json")  # what set_aside leaves in place (the store's lock and key)
# Top-level names that are not part of the record (see the module docstring); names
# starting with "." are skipped at every depth.
EXCLUDED = frozenset({DONE, METRICS, "key.json", "checkpoints"})


def record(stage_dir: str | os.PathLike) -> dict[str, dict]:
    """``{relative path: {"bytes", "sha256"}}`` of every file the stage wrote in its folder."""
    root = Path(stage_dir)
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        top = here == root
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (top and d in EXCLUDED))
        for name in sorted(filenames):
            if name.startswith(".") or (top and name in EXCLUDED):
                continue
            path = here / name
            if path.is_symlink() or not path.is_file():
                continue  # a stage writes plain files; a link's target is not its output
            rel = path.relative_to(root).as_posix()
            out[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return out


@dataclass(frozen=True)
class Verdict:
    state: str  # "absent" (no done.json) | "ok" | "legacy" (no record) | "damaged"
    problem: str = ""  # what is wrong, for "damaged"


def verify(stage_dir: str | os.PathLike) -> Verdict:
    """Whether ``stage_dir`` holds a finished stage whose recorded files are intact."""
    root = Path(stage_dir)
    done = root / DONE
    if not done.exists() and not done.is_symlink():
        return Verdict("absent")
    try:
        summary = json.loads(done.read_text())
    except (OSError, UnicodeDecodeError) as e:
        return Verdict("damaged", f"{DONE}: unreadable ({e.__class__.__name__}: {e})")
    except json.JSONDecodeError as e:
        return Verdict("damaged", f"{DONE}: not valid JSON ({e.msg} at character {e.pos}; truncated?)")
    if not isinstance(summary, dict):
        return Verdict("damaged", f"{DONE}: not a JSON object")
    if FILES not in summary:
        return Verdict("legacy")
    files = summary[FILES]
    if not isinstance(files, dict):
        return Verdict("damaged", f"{DONE}: its {FILES!r} record is not an object")
    problems = [p for rel, want in files.items() if (p := _check_file(root, rel, want))]
    if problems:
        return Verdict("damaged", "; ".join(problems))
    return Verdict("ok")


def _check_file(root: Path, rel: str, want) -> str:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        return f"{rel}: not a path inside the stage folder"
    if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
        return f"{rel}: its record in {DONE} is malformed"
    path = root.joinpath(*parts)
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size != want["bytes"]:
        cut = " (truncated)" if size < want["bytes"] else ""
        return f"{rel}: {size} bytes, {want['bytes']} recorded{cut}"
    if sha256_file(path) != want["sha256"]:
        return f"{rel}: sha256 differs"
    return ""


def set_aside(stage_dir: str | os.PathLike) -> Path:
    """Move every file of ``stage_dir`` but ``KEPT`` and earlier ``.damaged-*`` folders into
    a new ``.damaged-<UTC time>`` folder inside it, ``done.json`` last; returns that folder."""
    root = Path(stage_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = root / f".damaged-{stamp}"
    n = 1
    while aside.exists():
        n += 1
        aside = root / f".damaged-{stamp}-{n}"
    aside.mkdir()
    names = sorted(p.name for p in root.iterdir()
                   if p.name not in KEPT and not p.name.startswith(".damaged-") and p.name != DONE)
    for name in [*names, DONE]:
        src = root / name
        if src.exists() or src.is_symlink():
            os.replace(src, aside / name)
    return aside


def check_finished(stage: str, stage_dir: str | os.PathLike, where: str) -> bool:
    """Rank 0: whether the stage in ``stage_dir`` may be reused. A damaged one is set aside
    (so that it is retrained from scratch) with one warning line; a legacy one (no
    record) is reused with one warning line. ``where`` names the folder in the warnings,
    e.g. ``"stage-store entry /store/pretrain-0123"``."""
    verdict = verify(stage_dir)
    if verdict.state == "absent":
        return False
    if verdict.state == "legacy":
        print(f"[{stage}] {where} has a {DONE} without checksums (written before they were recorded): "
              f"reused unverified", flush=True)
        return True
    if verdict.state == "damaged":
        aside = set_aside(stage_dir)
        print(f"[{stage}] {where} is damaged ({verdict.problem}): retraining from scratch "
              f"(its files are kept in {aside})", flush=True)
        return False
    return True

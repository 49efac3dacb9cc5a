"""Every config key a stage really reads is in its stage-store key (or changes only speed).

``tests/sweep/test_stage_keys.py`` checks the key against a hand-kept list; this test
checks it against the code. It wraps the real ``Config`` (``engine.config.load_config``)
in a *recording* copy: every dataclass in the tree becomes an instance of a subclass of
its own class (``isinstance``, ``dataclasses.fields`` and ``replace`` keep working)
whose ``__getattribute__`` records each read of a leaf field as a dotted key
(``distributed.grad_clip``, ``attack.badnets.pattern``). Properties and methods of the
config classes (``DataConfig.decode_side``, ``AttackConfig.section``) run on the
recording instance, so the fields they touch are recorded too. Reading a section
(``cfg.model``) records nothing by itself; the leaves read from it do.

Then every registered stage runs end to end, in this process, through
``engine.pipeline.run`` (the run data, the attack's poison, build, the training steps
with mid-epoch checkpoints, evaluation, the final save, ``save_outputs``, the feature
dump) at a size below that of ``tests/sweep/test_sweep_run.py`` on the tiny dataset of
``tests/conftest.py``: one run of pretrain -> linear -> finetune, finetune_labelled (on
the same pretrain and linear) and supervised under BadNets, and one of supervised under
Blended, so that another attack's section is read. The report written after the stages
is left out: it reads the run dir's files, not the config, and its t-SNE is slow.

Each read is attributed to a phase:

- a stage's phase: its ``preflight`` checks, and everything from its ``make_stage``
  until the next stage's (the stage, its Trainer, its evaluation and saves). Every key
  read in it must be covered (prefix match) by ``keys.declared_prefixes(stage)`` or by
  ``keys.SPEED_ONLY``.
- ``pipeline``: what ``pipeline.run`` reads before the first stage starts (dataset
  checks, the process group, the poison plan, the run data every stage trains on). The
  poison and the run data are the same whichever stage runs, so a key read here must
  be covered by the declared prefixes of *every* registered stage, or by ``SPEED_ONLY``.
  Serialising the whole config (``engine.settings.to_dict(cfg)``: the run's
  ``config.yaml`` and the stage store's own key computation) reads every key without
  using any, and is exempt in this phase only; ``to_dict`` of a section (an attack's
  trigger settings in its poison plan) counts like any other read, and inside a
  stage's phase so does everything.

``test_blended_run_and_an_undeclared_read`` proves the checker can fail: the Blended run
is made by a supervised stage that reads ``data.horizontal_flip`` (its weak views do)
but leaves it out of ``depends_on``, and is reported with exactly that key.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import engine.pipeline as pipeline
from engine.config import load_config
from engine.settings import to_dict
from engine.stages import STAGES
from engine.stages.base import INPUTS
from engine.stages.keys import SPEED_ONLY, declared_prefixes
from engine.defenses.none.supervised import Supervised
from tests.sweep.test_sweep_run import TINY

# The code objects that read each field in ``to_dict``: its inner ``conv`` and, before
# Python 3.12 inlined comprehensions, the dict comprehension inside it.
_CONV = next(c for c in to_dict.__code__.co_consts if getattr(c, "co_name", None) == "conv")
_TO_DICT_CODE = frozenset({_CONV, *(c for c in _CONV.co_consts if hasattr(c, "co_code"))})
PIPELINE = "pipeline"


class Recorder:
    """The keys read, by phase; ``serialised`` holds the reads made by ``to_dict`` of the
    whole config (``root``), which a stage store key or ``config.yaml`` makes."""

    def __init__(self) -> None:
        self.phase = PIPELINE
        self.root = None  # the recording Config
        self.reads: dict[str, set[str]] = defaultdict(set)
        self.serialised: dict[str, set[str]] = defaultdict(set)

    def read(self, key: str) -> None:
        # Frames: 0 this method, 1 the recording __getattribute__, 2 the reader.
        (self.serialised if self._whole_config_to_dict(sys._getframe(2)) else self.reads)[self.phase].add(key)

    def _whole_config_to_dict(self, frame) -> bool:
        if frame.f_code not in _TO_DICT_CODE:
            return False
        while frame is not None and frame.f_code is not to_dict.__code__:
            frame = frame.f_back
        return frame is not None and frame.f_locals.get("cfg") is self.root

    def stage_reads(self, phase: str) -> set[str]:
        return self.reads[phase] | self.serialised[phase]


def _is_section(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _recording_class(cls: type, prefix: str, recorder: Recorder) -> type:
    names = frozenset(f.name for f in dataclasses.fields(cls))

    def __getattribute__(self, attr):
        value = object.__getattribute__(self, attr)
        if attr in names and not _is_section(value):
            recorder.read(prefix + attr)
        return value

    # The prefix lives on the class, so a dataclasses.replace copy records alike.
    sub = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__module__": cls.__module__,
                                      "__qualname__": cls.__qualname__})
    return sub


def recording(obj, recorder: Recorder, prefix: str = ""):
    """A copy of the dataclass tree ``obj`` whose every leaf-field read is recorded."""
    new = object.__new__(_recording_class(type(obj), prefix, recorder))
    if not prefix:
        recorder.root = new
    for name, value in vars(obj).items():
        if _is_section(value):
            value = recording(value, recorder, f"{prefix}{name}.")
        object.__setattr__(new, name, value)
    return new


def covered(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def undeclared(stage: str, keys) -> list[str]:
    """The keys stage ``stage`` read that neither its key nor SPEED_ONLY covers."""
    allowed = (*declared_prefixes(stage), *SPEED_ONLY)
    return sorted(k for k in keys if not covered(k, allowed))


def undeclared_by_pipeline(keys) -> list[str]:
    """Keys read before any stage starts that some stage's key does not cover."""
    return sorted(k for k in keys if not covered(k, SPEED_ONLY)
                  and not all(covered(k, declared_prefixes(s)) for s in STAGES))


def problems(rec: Recorder) -> list[str]:
    """One line per phase that read a key its stage key does not cover, naming the keys."""
    out = []
    for phase in sorted(rec.reads.keys() | rec.serialised.keys()):
        if phase == PIPELINE:
            bad = undeclared_by_pipeline(rec.reads[phase])
        else:
            bad = undeclared(phase, rec.stage_reads(phase))
        if bad:
            out.append(f"{phase}: reads keys its stage key does not cover: {bad}")
    return out


def flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def tiny_config(root: Path, run_dir: Path, **changes):
    values = {**flat(TINY), "data.root": str(root), "run_dir": str(run_dir),
              # A mid-epoch checkpoint in every stage (its epochs are 2 steps long).
              "distributed.checkpoint_every": 1,
              # Fewer and smaller steps than TINY: 2 per epoch, 1 epoch (finetune: 2, so
              # that its second split swaps the loaders' subsets).
              "supervised.iterations_per_epoch": 2, "pretrain.iterations_per_epoch": 2,
              "pretrain.batch_size": 32, "linear.epochs": 1, "linear.iterations_per_epoch": 2,
              "finetune_labelled.epochs": 1, "finetune_labelled.batch_size": 50,
              # ABL: one epoch of each phase; ASD: a class-aware epoch, then a meta-split one.
              "abl.batch_size": 32, "abl.isolation_epochs": 1, "abl.finetune_epochs": 1,
              "abl.unlearning_epochs": 1, "abl.isolation_ratio": 0.1,
              "asd.epochs": 2, "asd.iterations_per_epoch": 2, "asd.batch_size": 16, "asd.seeds_per_class": 2,
              "asd.growth_every": 1, "asd.class_aware_until": 1, "asd.meta_from": 1, "asd.meta_batch_size": 32,
              **changes}
    return load_config(None, values=values)


@pytest.fixture
def run_recorded(monkeypatch):
    """``run(cfg, stages)``: one ``engine.pipeline.run`` of ``stages`` under a recording copy
    of ``cfg``; returns the Recorder, whose phase follows the stage at work."""
    import engine.report.build

    threads, environ = torch.get_num_threads(), dict(os.environ)
    real_preflight, real_make_stage = pipeline.preflight, pipeline.make_stage
    # The report after the stages reads only the run dir's files (no config object) and
    # its t-SNE plot is most of a tiny run's time: left out.
    monkeypatch.setattr(engine.report.build, "build_report", lambda run_dir, columns: "")

    def run(cfg, stages) -> Recorder:
        recorder = Recorder()

        def preflight(cfg, world_size, stages=None):
            for name in stages:  # each stage's checks, in that stage's phase
                recorder.phase = name
                real_preflight(cfg, world_size, (name,))
            recorder.phase = PIPELINE

        def make_stage(cfg, name, **kwargs):
            recorder.phase = name  # until the next stage's make_stage (or the end of the run)
            return real_make_stage(cfg, name, **kwargs)

        monkeypatch.setattr(pipeline, "preflight", preflight)
        monkeypatch.setattr(pipeline, "make_stage", make_stage)
        results = pipeline.run(recording(cfg, recorder), stages=stages)
        for name in stages:
            assert name in results and (Path(cfg.run_dir) / name / "done.json").is_file(), name
        return recorder

    try:
        yield run
    finally:
        # The engine sets torch's threads from the cores per rank and RANK, WORLD_SIZE and
        # LOCAL_RANK for the libraries it starts: none of it may leak into later tests.
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)


def test_recording_config_behaves_like_the_config():
    cfg = load_config(None)
    rec = Recorder()
    r = recording(cfg, rec)
    assert isinstance(r, type(cfg)) and isinstance(r.data, type(cfg.data)) and to_dict(r) == to_dict(cfg)
    assert not rec.reads[PIPELINE]  # to_dict's reads are kept apart
    assert len(rec.serialised[PIPELINE]) == len(flat(to_dict(cfg)))
    to_dict(r.model)  # serialising a section is not exempt
    assert rec.reads.pop(PIPELINE) == {"model.arch", "model.width", "model.proj_hidden", "model.proj_dim"}
    assert r.data.decode_side == cfg.data.decode_side
    assert r.attack.section.pattern == cfg.attack.badnets.pattern
    assert rec.reads[PIPELINE] == {"data.decode_size", "data.image_size", "attack.name", "attack.badnets.pattern"}
    copy = dataclasses.replace(r.model, width=8)  # replace reads every field it copies
    assert isinstance(copy, type(cfg.model)) and copy.width == 8 and "model.width" in rec.reads[PIPELINE]
    # Before any stage, a key must be in every stage's key (or change only speed).
    assert undeclared_by_pipeline({"attack.target", "runtime.threads", "finetune.epsilon"}) == ["finetune.epsilon"]


def test_every_stage_reads_only_what_its_key_holds(run_recorded, tmp_path, color_root):
    chain = ("pretrain", "linear", "finetune", "finetune_labelled", "supervised", "abl", "asd")
    rec = run_recorded(tiny_config(color_root, tmp_path / "badnets"), chain)
    assert not problems(rec), "\n".join(problems(rec))

    # The recording saw the real reads: each stage's own section, the shared settings
    # its model, views and backend use, and the chosen attack's section.
    assert set(rec.reads) == {PIPELINE, *chain} == {PIPELINE, *STAGES}
    for stage in chain:
        reads = rec.stage_reads(stage)
        assert f"{stage}.batch_size" in reads and "model.width" in reads, (stage, sorted(reads))
        assert {"data.mean", "distributed.batch_semantics", "seed", "precision"} <= reads, (stage, sorted(reads))
    assert "distributed.checkpoint_every" in rec.stage_reads("supervised")
    assert {"finetune.epsilon", "finetune.view.padding"} <= rec.stage_reads("finetune")
    assert {"abl.isolation_ratio", "abl.cutout", "abl.unlearning_lr"} <= rec.stage_reads("abl")
    assert {"asd.seeds", "asd.meta_lr", "asd.meta_params"} <= rec.stage_reads("asd")
    assert any(k.startswith("attack.badnets.") for k in rec.reads[PIPELINE])
    assert not any(k.startswith("attack.blended.") for k in rec.reads[PIPELINE])


def test_blended_run_and_an_undeclared_read(run_recorded, tmp_path, color_root):
    """Supervised under Blended (the attack's own section is read), run as a stage whose
    ``depends_on`` forgets ``data.horizontal_flip``, which its weak views read: the checker
    reports exactly that key; with the real stage's ``depends_on``, the same reads pass.
    ``Config`` has a section per stage name, so the impostor takes the name (and section)
    ``supervised`` while it runs; it differs from the real stage in ``depends_on`` only."""

    class ForgetsFlip(Supervised):
        depends_on = tuple(k for k in INPUTS if k != "data.horizontal_flip")

    real = STAGES["supervised"]
    STAGES["supervised"] = ForgetsFlip
    try:
        rec = run_recorded(tiny_config(color_root, tmp_path / "blended", **{"attack.name": "blended"}),
                           ("supervised",))
        assert problems(rec) == ["supervised: reads keys its stage key does not cover: ['data.horizontal_flip']"]
    finally:
        STAGES["supervised"] = real
    assert problems(rec) == []
    assert any(k.startswith("attack.blended.") for k in rec.reads[PIPELINE])
    assert not any(k.startswith("attack.badnets.") for k in rec.reads[PIPELINE])

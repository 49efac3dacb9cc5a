"""A finished stage is verified before reuse (engine.stages.integrity).

The checksums in ``done.json`` are compared with ``hashlib`` run here on the real files
of a real (tiny) stage the Trainer trained; each kind of damage to a store entry is
made on a copy of that entry, and the entry must be set aside with one warning and
retrained from scratch, as ``dbd run`` does (the attach-then-train loop of
engine.pipeline, in process). One ``dbd run`` in a real process checks the same for a
plain run dir; the clear-error cases run the CLI as a user would and need no training.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from engine.config import load_config, to_dict
from engine.runtime.launch import DistInfo
from engine.stages import integrity
from engine.stages.store import StageStore

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="single")
STAGE = "supervised"
# The pattern dataset (200 training, 40 test images), one step of 16 images.
TINY = {"stages": [STAGE], "seed": 0, "device": "cpu",
        "data": {"name": "cifar10", "num_workers": 1},
        "attack": {"name": "badnets", "target": 0, "ratio": 0.1, "select_from": "all"},
        "model": {"arch": "cifar_resnet18", "width": 4},
        STAGE: {"epochs": 1, "iterations_per_epoch": 1, "batch_size": 16},
        "logging": {"progress": False, "log_every": 0}}


def _overrides(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _overrides(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Tiny:
    """The tiny config, its data (built once) and the pipeline's attach-then-train loop."""

    def __init__(self, root: Path, work: Path):
        from engine.attacks.runtime import build_poison
        from engine.data.prepare import load_meta
        from engine.data.run_data import DatasetMeta, RunData

        self.root = root
        self.cfg = self.config(work / "run", work / "store")
        meta = load_meta(root)
        (work / "run").mkdir(parents=True)
        self.data = RunData(self.cfg.data, DatasetMeta.from_raw(meta), SINGLE, self.cfg.seed,
                            build_poison(self.cfg, meta, work / "run"))

    def config(self, run_dir: Path, store: Path):
        return load_config(None, _overrides(TINY) + [f"data.root={self.root}", f"run_dir={run_dir}",
                                                     f"stage_store={store}"])

    def store(self, store: Path) -> StageStore:
        return StageStore(store, to_dict(self.config(Path("unused"), store)), dataset_hash="h", world_size=1)

    def attach_and_train(self, store: Path, run_dir: Path) -> bool:
        """engine.pipeline.run's loop for one stage: whether the entry was reused."""
        from engine.pipeline import make_stage
        from engine.report.metrics import MetricsWriter
        from engine.stages.trainer import Trainer

        cfg = self.config(run_dir, store)
        with self.store(store).attach(STAGE, run_dir, SINGLE) as complete:
            if not complete:
                metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=True)
                stage = make_stage(cfg, STAGE, run_dir=run_dir, dist=SINGLE, data=self.data, metrics=metrics)
                Trainer(stage, logging=cfg.logging, checkpoint_every=0).run()
        return complete


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, color_root) -> Tiny:
    return Tiny(color_root, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pristine(tiny, tmp_path_factory) -> Path:
    """A store entry the Trainer finished, never modified by a test (tests copy it)."""
    work = tmp_path_factory.mktemp("pristine")
    assert not tiny.attach_and_train(work / "store", work / "run")
    return tiny.store(work / "store").entry(STAGE)


def _copy_entry(tiny: Tiny, pristine: Path, tmp_path: Path) -> Path:
    entry = tiny.store(tmp_path / "store").entry(STAGE)
    assert entry.name == pristine.name  # the same key: the copy is what a rerun would find
    shutil.copytree(pristine, entry, symlinks=True)
    return entry


def test_done_json_records_every_output_with_an_independent_sha256(pristine):
    files = json.loads((pristine / "done.json").read_text())["files"]
    assert set(files) == {"model.pt", "features.npz"}  # not metrics.jsonl, key.json, .lock, checkpoints/
    for rel, want in files.items():
        path = pristine / rel
        assert want == {"bytes": path.stat().st_size, "sha256": _sha256(path)}, rel
    assert (pristine / "metrics.jsonl").is_file() and (pristine / "checkpoints").is_dir()
    assert integrity.verify(pristine) == integrity.Verdict("ok")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "model truncated": ("model.pt", _truncate, "model.pt: {size} bytes, {recorded} recorded (truncated)"),
    "model byte flipped": ("model.pt", _flip_byte, "model.pt: sha256 differs"),
    "model deleted": ("model.pt", Path.unlink, "model.pt: missing"),
    "done.json truncated": ("done.json", _truncate, "done.json: not valid JSON"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_entry_is_set_aside_and_retrained_from_scratch(case, tiny, pristine, tmp_path, capsys):
    name, damage, message = DAMAGE[case]
    entry = _copy_entry(tiny, pristine, tmp_path)
    recorded = json.loads((pristine / "done.json").read_text())["files"]["model.pt"]["bytes"]
    damage(entry / name)
    damaged_bytes = (entry / name).read_bytes() if (entry / name).exists() else None
    capsys.readouterr()

    assert not tiny.attach_and_train(tmp_path / "store", tmp_path / "run")
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "is damaged" in line]
    expected = message.format(size=recorded // 2, recorded=recorded)
    assert len(warnings) == 1 and warnings[0].startswith(f"[{STAGE}] stage-store entry {entry} is damaged ("), out
    assert expected in warnings[0] and "retraining" in warnings[0], warnings[0]
    # Retrained from scratch, not resumed from the damaged entry's checkpoints, not reused.
    assert out.count(f"[{STAGE}] starting") == 1 and "resuming" not in out and "reused" not in out, out

    # done.json rewritten, a new model.pt, both checked here with hashlib.
    done = json.loads((entry / "done.json").read_text())
    assert done["files"]["model.pt"] == {"bytes": (entry / "model.pt").stat().st_size,
                                        "sha256": _sha256(entry / "model.pt")}
    assert integrity.verify(entry).state == "ok"
    # The damaged files are kept aside, as they were; the lock and key stayed in place.
    (aside,) = [p for p in entry.iterdir() if p.name.startswith(".damaged-")]
    if damaged_bytes is None:
        assert not (aside / name).exists()
    else:
        assert (aside / name).read_bytes() == damaged_bytes
    assert (aside / "checkpoints").is_dir() and (aside / "done.json").is_file()
    assert (entry / ".lock").is_file() and (entry / "key.json").is_file() and not (aside / ".lock").exists()

    # The next run reuses the retrained entry without a word of damage.
    assert tiny.attach_and_train(tmp_path / "store", tmp_path / "run2")
    out = capsys.readouterr().out
    assert "is damaged" not in out and "starting" not in out and "reused" in out, out


def test_a_done_json_without_checksums_is_reused_with_one_warning(tiny, pristine, tmp_path, capsys):
    entry = _copy_entry(tiny, pristine, tmp_path)
    done = json.loads((entry / "done.json").read_text())
    del done["files"]
    (entry / "done.json").write_text(json.dumps(done))
    _flip_byte(entry / "model.pt")  # cannot be seen without a record: that is the warning's point
    capsys.readouterr()
    assert tiny.attach_and_train(tmp_path / "store", tmp_path / "run")
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "without checksums" in line] == [
        f"[{STAGE}] stage-store entry {entry} has a done.json without checksums "
        f"(written before they were recorded): reused unverified"], out
    assert "starting" not in out and not any(p.name.startswith(".damaged-") for p in entry.iterdir())


def test_record_walks_subfolders_and_skips_what_changes_after_done(tmp_path):
    d = tmp_path / "stage"
    (d / "split" / "e1").mkdir(parents=True)
    (d / "checkpoints" / "e00001-s0000000").mkdir(parents=True)
    files = {"model.pt": b"weights", "split/e1/labelled.npy": os.urandom(3 * (1 << 20) + 5)}
    for rel, data in files.items():
        (d / rel).write_bytes(data)
    for rel in ("metrics.jsonl", "key.json", ".lock", ".model.pt.abc.tmp", "done.json",
                "checkpoints/e00001-s0000000/train_state.pt", "split/.partial.tmp"):
        (d / rel).write_bytes(b"changes later")
    assert integrity.record(d) == {rel: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                   for rel, data in files.items()}


def test_a_damaged_plain_stage_folder_is_set_aside_by_the_pipeline(tmp_path, capsys):
    from engine.pipeline import _own_folder

    folder = tmp_path / "run" / STAGE
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    (folder / "done.json").write_text(json.dumps({"files": integrity.record(folder)}))
    with _own_folder(STAGE, tmp_path / "run", SINGLE) as complete:
        assert complete
    (folder / "model.pt").write_bytes(b"weightz")
    with _own_folder(STAGE, tmp_path / "run", SINGLE) as complete:
        assert not complete
    out = capsys.readouterr().out
    assert out.count("is damaged") == 1 and f"stage folder {folder} is damaged (model.pt: sha256 differs)" in out
    assert sorted(p.name for p in folder.iterdir()) == [next(folder.glob(".damaged-*")).name]


# --------------------------------------------------------------------------- the CLI


def dbd(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _write_config(tmp_path: Path, root: Path, **top) -> Path:
    path = tmp_path / "cfg.yaml"
    cfg = {**TINY, **top}
    path.write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "root": str(root)}}))
    return path


def _one_line_error(proc, *needles: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode not in (0, None) and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err


@pytest.mark.slow
def test_dbd_run_reruns_a_damaged_stage_of_a_plain_run_dir(tmp_path, color_root):
    run_dir = tmp_path / "run"
    cfg = _write_config(tmp_path, color_root, run_dir=str(run_dir))
    # A finished stage folder (as an earlier run left it), then a flipped byte.
    (run_dir / STAGE).mkdir(parents=True)
    (run_dir / STAGE / "model.pt").write_bytes(b"earlier weights")
    (run_dir / STAGE / "done.json").write_text(json.dumps({"files": integrity.record(run_dir / STAGE)}))
    _flip_byte(run_dir / STAGE / "model.pt")
    proc = dbd("run", cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if "is damaged" in line]
    assert lines == [line for line in lines if f"stage folder {run_dir / STAGE} is damaged (model.pt: sha256 differs)"
                     in line] and len(lines) == 1, proc.stdout
    assert proc.stdout.count(f"[{STAGE}] starting") == 1 and "complete, skipped" not in proc.stdout
    done = json.loads((run_dir / STAGE / "done.json").read_text())
    assert done["files"]["model.pt"]["sha256"] == _sha256(run_dir / STAGE / "model.pt")
    assert (run_dir / "report.md").is_file()


def test_a_stage_store_that_is_a_file_is_one_clear_error(tmp_path, color_root):
    (tmp_path / "afile").write_text("not a folder")
    cfg = _write_config(tmp_path, color_root, run_dir=str(tmp_path / "run"))
    _one_line_error(dbd("run", cfg, f"stage_store={tmp_path / 'afile'}"), "is a file, not a folder")
    _one_line_error(dbd("run", cfg, f"stage_store={tmp_path / 'afile' / 'store'}"), "cannot be created")


def test_links_into_a_store_that_is_gone_are_one_clear_error(tmp_path, color_root):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / STAGE).symlink_to("../store/supervised-0123456789abcdef", target_is_directory=True)
    cfg = _write_config(tmp_path, color_root, run_dir=str(run_dir))
    _one_line_error(dbd("run", cfg), f"{run_dir / STAGE} links to ../store/supervised-0123456789abcdef, "
                                     f"which does not exist", "set stage_store")
    assert not (run_dir / "config.yaml").exists()  # before any work
    _one_line_error(dbd("report", run_dir), "no finished stage")

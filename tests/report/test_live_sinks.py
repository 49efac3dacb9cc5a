"""Live sinks (engine/report/live.py): while a run trains, TensorBoard's live event files
and an offline W&B run get every record, rank 0 only; a killed run resumed logs into the
same W&B run, and the report replaces the live event files by the rebuilt one. Read back
with TensorBoard's own reader and by parsing the W&B transaction log itself."""
from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

from tests.report.test_tensorboard import read_back  # noqa: E402
from tests.runtime.helpers import check, dbd_cmd, run, run_dir, write_config  # noqa: E402


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a ``.wandb`` file: W&B's LevelDB-style log (a 7-byte ``:W&B``
    header, 32 KiB blocks of records with a 7-byte header: crc, length, type full /
    first / middle / last), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, raws = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # too small for a header: the block's zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 1:
            raws.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            raws.append(pending + chunk)
    rows = []
    for raw in raws:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_a_killed_run_resumed_logs_live_to_tensorboard_and_one_wandb_run(digits_root, tmp_path):
    cfg = write_config(tmp_path, digits_root, "live", logging={"progress": False, "log_every": 1, "feature_map": False,
                                                                "tensorboard": True, "wandb": "offline"})
    rdir = run_dir(cfg)
    first = run(dbd_cmd(cfg), DBD_FAULT_EXIT_AT_STEP="5:0:kill", WANDB_SILENT="true")
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    # Live: the steps before the kill are already in TensorBoard's files.
    live = read_back(rdir / "tensorboard" / "live")["pretrain/step/loss"]
    assert sorted(live) == [0, 1, 2, 3, 4]
    run_id = (rdir / "wandb_id").read_text().strip()

    check(run(dbd_cmd(cfg), WANDB_SILENT="true"))
    # The report replaced the live files by one rebuilt from metrics.jsonl: each step once.
    assert not (rdir / "tensorboard" / "live").exists()
    losses = {r["global_step"]: r["loss"] for r in map(json.loads, (rdir / "metrics.jsonl").read_text().splitlines())
              if r.get("kind") == "step"}
    assert read_back(rdir / "tensorboard")["pretrain/step/loss"] == pytest.approx(losses)
    # W&B: both attempts are offline runs under the run dir with the one id, so `wandb
    # sync` uploads them into one run; the resumed attempt logged the steps from its
    # checkpoint (step 4) on, with the same values as metrics.jsonl.
    runs = sorted((rdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    rows = wandb_history(runs[-1] / f"run-{run_id}.wandb")
    logged = {row["pretrain/step/x"]: row["pretrain/step/loss"] for row in rows if "pretrain/step/loss" in row}
    assert logged == pytest.approx({s: losses[s] for s in range(4, 8)})


def test_a_failing_sink_costs_no_record_and_is_dropped(tmp_path, capsys):
    from engine.report.metrics import MetricsWriter, read_metrics

    class Broken:
        calls = 0

        def write(self, record):
            Broken.calls += 1
            raise ConnectionError("no network")

        def close(self):
            pass

    writer = MetricsWriter(tmp_path / "metrics.jsonl", sinks=(Broken(),), stage="s")
    writer.log("step", global_step=0, loss=1.0)
    writer.with_context(epoch=0).log("step", global_step=1, loss=0.5)
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 0.5]
    assert Broken.calls == 1
    assert "Broken failed (ConnectionError: no network)" in capsys.readouterr().err

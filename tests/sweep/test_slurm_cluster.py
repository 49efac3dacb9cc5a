"""``dbd sweep --slurm`` on a real Slurm: a one-node cluster on localhost (slurmctld, slurmd
and munge from Debian, which ``make test`` installs), a two-cell array whose second cell
reuses the first one's stage and so waits for it, submitted by the generated submit.sh;
and a cell that fails in its task, recorded failed (its status.json, then cells.json and
the leaderboard through ``dbd leaderboard``).

Skipped, with the reason, where the daemons are missing or cannot be started (not root,
or no Debian packages)."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.runtime.helpers import free_port
from tests.sweep.test_sweep_run import TINY

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")


def _wait(predicate, timeout: float, what: str, log: Path | None = None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        pytest.skip(f"no local Slurm: {', '.join(missing)} not installed (make test installs slurmctld, "
                    "slurmd, slurm-client and munge as root)")
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (munged and slurmd run as root here)")
    tmp = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "munge"):
        (tmp / d).mkdir()
    key = tmp / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = tmp / "munge" / "munge.socket"
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    ctld_port, slurmd_port = sorted(ports)
    conf = tmp / "slurm.conf"
    conf.write_text(f"""ClusterName=dbdtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = [subprocess.Popen(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--log-file={tmp}/munge/munged.log", f"--pid-file={tmp}/munge/munged.pid",
                               f"--seed-file={tmp}/munge/munged.seed"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)]
    try:
        _wait(sock.exists, 20, "munged's socket", tmp / "munge" / "munged.log")
        procs.append(subprocess.Popen(["slurmctld", "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT))
        procs.append(subprocess.Popen(["slurmd", "-D", "-f", str(conf), "-N", host], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))

        def idle() -> bool:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return r.returncode == 0 and r.stdout.strip() == "idle"

        try:
            _wait(idle, 60, "the node to be idle", tmp / "slurmctld.log")
        except AssertionError as e:
            pytest.skip(f"a local Slurm did not start here: {str(e)[:2000]}")
        yield env, tmp
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def submit_grid(env, tmp_path, color_root, grid: dict, time_limit: str):
    """Write the tiny base config and a grid of ``grid``, ``dbd sweep --slurm`` it and run
    its submit.sh against the local Slurm; returns (sweep folder, submit.sh's result)."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**TINY, "logging": {"progress": False, "log_every": 1, "feature_map": False}}))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "base": str(base), "overrides": {"data.root": str(color_root)}, "grid": grid,
        "slurm": {"tasks_per_node": 1, "cpus_per_task": 1, "time": time_limit},
    }, sort_keys=False))
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-m", "engine", "sweep", str(path), "--slurm", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sub = subprocess.run(["bash", str(out / "submit.sh")], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    return out, sub


def wait_drained(env, seconds: int, what: str, log) -> None:
    def drained() -> bool:
        q = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
        return q.returncode == 0 and not q.stdout.strip()

    _wait(drained, seconds, what, log)


def test_two_cell_array_for_real(cluster, tmp_path, color_root):
    env, cluster_dir = cluster
    # Two baseline cells that differ only in a fine-tuning key: the second reuses the
    # first one's supervised stage, so submit.sh puts it in a second wave.
    out, sub = submit_grid(env, tmp_path, color_root, {"finetune.lambda_u": [15, 5], "defense": ["none"]},
                           "00:15:00")
    assert "wave 0: job" in sub.stdout and "wave 1: job" in sub.stdout
    wait_drained(env, 600, "the array jobs to finish", cluster_dir / "slurmctld.log")
    logs = sorted((out / "slurm").glob("*.out"))
    text = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in logs)
    assert len(logs) == 2, text
    first, second = (out / "cells" / f"finetune.lambda_u-{v}__defense-none" for v in (15, 5))
    for cell in (first, second):
        assert (cell / "supervised" / "done.json").is_file() and (cell / "summary.json").is_file(), text
    assert (first / "supervised").resolve() == (second / "supervised").resolve()
    done = json.loads((first / "supervised" / "done.json").read_text())
    assert done["cost"]["world_size"] == 1 and done["cost"]["images"] == 6 * 32
    # The second task found the stage finished: it reused it and trained nothing.
    second_log = next(p.read_text() for p in logs if "cell 1:" in p.read_text())
    assert "complete in the stage store" in second_log and "[supervised] starting" not in second_log, text
    # Each task recorded its cell done; `dbd leaderboard` carries that into cells.json.
    for cell in (first, second):
        status = json.loads((cell / "status.json").read_text())
        assert status["status"] == "done" and re.fullmatch(r"\d+_\d+", status["job"]), (status, text)
    r = subprocess.run([sys.executable, "-m", "engine", "leaderboard", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "cells.json").read_text())
    assert [c["status"] for c in index["cells"]] == ["done", "done"]


def test_failed_cell_recorded_for_real(cluster, tmp_path, color_root):
    """A cell whose task fails (attack.target 99 of 10 classes: the run's dataset check)
    shows as failed, with its error, in its status.json, cells.json and the leaderboard."""
    env, cluster_dir = cluster
    out, _ = submit_grid(env, tmp_path, color_root, {"attack.target": [99], "defense": ["none"]}, "00:05:00")
    wait_drained(env, 300, "the array job to finish", cluster_dir / "slurmctld.log")
    text = "\n".join(p.read_text()[-3000:] for p in (out / "slurm").glob("*.out"))
    cell = out / "cells" / "attack.target-99__defense-none"
    error = "config: attack.target 99 is outside the 10 classes of cifar10"
    status = json.loads((cell / "status.json").read_text())
    assert status["status"] == "failed" and status["error"] == error, (status, text)
    assert re.fullmatch(r"\d+_0", status["job"]) and (cell / "error.txt").is_file()
    assert json.loads((out / "cells.json").read_text())["cells"][0]["status"] == "pending"  # until refreshed
    r = subprocess.run([sys.executable, "-m", "engine", "leaderboard", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    entry = json.loads((out / "cells.json").read_text())["cells"][0]
    assert entry["status"] == "failed" and entry["error"] == error and entry["job"] == status["job"]
    assert f"- {cell.name}: {error}" in (out / "leaderboard.md").read_text()
    row = next(csv.DictReader((out / "leaderboard.csv").open()))
    assert row["status"] == "1 failed" and error in row["errors"]

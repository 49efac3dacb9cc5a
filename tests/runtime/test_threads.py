"""torch's CPU threads are the engine's choice (``runtime.threads``), never FFCV's.

The default is the cores per local rank; building and iterating an FFCV loader leaves
torch's count alone; ``data.num_workers`` changes only speed (bit-identical losses);
every stage's done.json records the counts; under ``torchrun --nproc_per_node 2`` each
rank gets its share of the cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from engine.config import load_config
from engine.errors import UserError
from engine.runtime import threads
from tests.runtime.helpers import (REPO, check, dbd_cmd, env, free_port, run, run_dir, torchrun_cmd,
                                   write_config)

CORES = len(os.sched_getaffinity(0))


def test_default_is_the_cores_per_local_rank():
    assert threads.resolve(0, 1, cores=2) == 2
    assert threads.resolve(0, 2, cores=2) == 1
    assert threads.resolve(0, 3, cores=2) == 1  # at least one
    assert threads.resolve(0, 4, cores=16) == 4
    assert threads.resolve(0, None, cores=8) == 8  # a launcher that does not say: alone
    assert threads.resolve(3, 2, cores=2) == 3  # an explicit count is kept
    assert load_config(None, ["runtime.threads=3"]).runtime.threads == 3
    with pytest.raises(UserError, match="runtime.threads"):
        load_config(None, ["runtime.threads=-1"])


def _python(code: str, **extra: str) -> dict:
    """Run ``code`` in a fresh interpreter (launcher variables from ``extra``); its last
    stdout line, parsed as JSON."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env(**extra),
                          capture_output=True, text=True, timeout=300)
    check(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


_INIT = """
    import json, torch
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown
    cfg = load_config(None, ["device=cpu"] + OVERRIDES)
    dist = init_distributed(cfg.device, cfg.distributed, cfg.runtime)
"""


@pytest.mark.parametrize("local_world", [1, 2])
def test_init_distributed_sets_the_share_of_the_local_rank(local_world):
    # A one-rank job whose launcher says `local_world` ranks share this node.
    got = _python("OVERRIDES = []\n" + textwrap.dedent(_INIT) + "print(json.dumps(torch.get_num_threads()))",
                  RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE=str(local_world),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="7")
    assert got == max(1, CORES // local_world)


@pytest.mark.parametrize("ffcv_first", [False, True])
def test_an_ffcv_loader_leaves_torch_threads_alone(digits_root, ffcv_first):
    # 3 threads: neither FFCV's import-time 1 nor the loader's 2 workers. ``ffcv_first``:
    # FFCV imported (its import sets torch to 1 thread) before the engine sets its count.
    code = (("import ffcv.loader\n" if ffcv_first else "") + "OVERRIDES = ['runtime.threads=3']\n"
            + textwrap.dedent(_INIT) + f"""
from engine.data.loaders import LoaderSpec, make_loader
from ffcv.pipeline.compiler import Compiler
seen = [torch.get_num_threads()]
spec = LoaderSpec(root={str(digits_root)!r}, split="test", batch_size=50, shuffle=True, drop_last=False,
                  num_workers=2)
loader = make_loader(spec)
seen.append(torch.get_num_threads())
n = 0
for epoch in range(2):
    for images, labels, index in loader:
        n += len(labels)
        seen.append(torch.get_num_threads())
print(json.dumps({{"seen": sorted(set(seen)), "n": n, "numba": Compiler.num_threads}}))
""")
    got = _python(code)
    assert got["n"] == 2 * 450
    assert got["seen"] == [3]
    assert got["numba"] == min(2, CORES)  # FFCV's decoding threads are still num_workers


def _cost(rdir) -> dict:
    return json.loads((rdir / "pretrain" / "done.json").read_text())["cost"]


def _losses(rdir) -> dict[int, float]:
    out = {}
    for line in (rdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "step" and r.get("stage") == "pretrain":
            out[r["global_step"]] = r["loss"]
    return out


@pytest.mark.slow
def test_num_workers_changes_only_speed(tmp_path, digits_root):
    runs = {}
    for workers in (1, 2):
        cfg = write_config(tmp_path, digits_root, f"w{workers}", **{"data.num_workers": workers, "pretrain.epochs": 1,
                                                                  "runtime.threads": 0})  # the default rule
        check(run(dbd_cmd(cfg)))
        runs[workers] = run_dir(cfg)
    one, two = _losses(runs[1]), _losses(runs[2])
    assert sorted(one) == [0, 1, 2, 3]
    assert one == two  # bit-identical, not approximately equal
    for workers, rdir in runs.items():
        cost = _cost(rdir)
        assert cost["torch_threads"] == CORES  # one process: every core
        assert cost["ffcv_workers"] == min(workers, CORES)


@pytest.mark.slow
def test_torchrun_two_ranks_share_the_cores(tmp_path, digits_root):
    cfg = write_config(tmp_path, digits_root, "torchrun", **{"data.num_workers": 2, "pretrain.epochs": 1,
                                                                  "runtime.threads": 0})
    proc = check(run(torchrun_cmd("--nproc_per_node", "2", "--master_port", free_port(), "-m", "engine", "run", cfg)))
    share = max(1, CORES // 2)
    assert f"torch_threads={share} per rank (2 ranks on this node)" in proc.stdout
    cost = _cost(run_dir(cfg))
    # The max and min over both ranks: an int only where every rank had the same count.
    assert cost["world_size"] == 2 and cost["torch_threads"] == share
    assert cost["ffcv_workers"] == min(2, share)
    if share == CORES:  # one core (a pinned test worker): the cap is the machine's, not the share's
        assert f"data.num_workers=2 but only {CORES} cores are available" in proc.stdout
    elif share < 2:
        assert f"data.num_workers=2 but only {share} of the {CORES} cores are this rank's share" in proc.stdout

"""Weak scaling of the SimCLR step on CPU: world size 1, 2, ... with a fixed per-rank batch.

Each world size is a real multi-process job: W Python processes rendezvous through
torch.distributed (gloo, the launcher-agnostic ``env://`` variables the engine reads)
and run the pretrain stage's step (benchmarks/rigs.py): views on the device, the
forward of both views, NT-Xent over the embeddings of all ranks, DDP's gradient
all-reduce, SyncBatchNorm as the reference configures it, the update.

Every rank gets the same number of threads whatever W (cores // largest W), so the
per-rank work and resources stay fixed and only the distribution costs change:
efficiency(W) = throughput(W) / (W x throughput(1)), 1.0 being perfect. Launches of
the different world sizes alternate; each launch times several windows of steps after
warm-up, between barriers, on rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import measurement

FULL = dict(width=16, per_rank_batch=64, warmup=2, steps=3, windows=3, launches=2, max_world=4)
QUICK = dict(width=4, per_rank_batch=8, warmup=1, steps=2, windows=1, launches=1, max_world=2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> int:
    """One rank of a scaling job (started by ``launch`` with RANK/WORLD_SIZE set)."""
    import torch

    torch.set_num_threads(args.threads)
    from benchmarks.rigs import SimCLRRig, make_config, start
    from engine.runtime.launch import barrier, shutdown

    cfg = make_config(backend="ddp", precision="fp32", device="cpu", width=args.width, num_workers=args.threads)
    dist = start(cfg)
    try:
        rig = SimCLRRig(cfg, dist, args.batch)
        gen = torch.Generator().manual_seed(dist.rank)
        images = torch.randint(0, 256, (args.batch, 32, 32, 3), dtype=torch.uint8, generator=gen)
        step = 0

        def one():
            nonlocal step
            rig.train(rig.inputs(images, 0, step))
            step += 1

        for _ in range(args.warmup):
            one()
        rates = []
        for _ in range(args.windows):
            barrier()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one()
            barrier()
            rates.append(args.steps * args.batch * dist.world_size / (time.perf_counter() - t0))
        if dist.rank == 0:
            from engine.fsutil import write_json

            write_json(Path(args.out), {"world": dist.world_size, "rates": rates, "threads": torch.get_num_threads()})
    finally:
        shutdown()
    return 0


def launch(world: int, s: dict, threads: int, timeout: float) -> dict:
    """Start ``world`` ranks on this machine and return rank 0's report."""
    with tempfile.TemporaryDirectory(prefix="dbd-scaling-") as tmp:
        out = Path(tmp) / "rank0.json"
        port = _free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
            env.pop("TORCHELASTIC_RUN_ID", None)
            cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", "--out", str(out),
                   "--threads", str(threads), "--width", str(s["width"]), "--batch", str(s["per_rank_batch"]),
                   "--warmup", str(s["warmup"]), "--steps", str(s["steps"]), "--windows", str(s["windows"])]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + timeout
        codes = []
        try:
            for p in procs:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"scaling job at world size {world} did not finish within {timeout:.0f} s") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(codes) or not out.is_file():
            raise RuntimeError(f"scaling job at world size {world} failed (exit statuses {codes})")
        return json.loads(out.read_text())


def run(quick: bool = False) -> dict:
    s = QUICK if quick else FULL
    cores = os.cpu_count() or 1
    worlds = [w for w in (1, 2, 4, 8) if w <= min(cores, s["max_world"])] or [1]
    if len(worlds) == 1 and quick:
        worlds = [1, 2]  # a 1-core machine still checks the 2-process path (oversubscribed)
    threads = max(1, cores // max(worlds))
    rates: dict[int, list[float]] = {w: [] for w in worlds}
    timeout = 240 if quick else 600
    for k in range(s["launches"]):
        for w in (worlds if k % 2 == 0 else worlds[::-1]):
            rates[w].extend(launch(w, s, threads, timeout)["rates"])
    base = measurement("images/s", rates[worlds[0]])["median"]
    measurements = {}
    efficiency = {}
    for w in worlds:
        m = measurement("images/s", rates[w], world_size=w)
        measurements[f"world{w}/images_per_s"] = m
        eff = m["median"] / (w * base)
        efficiency[str(w)] = eff
        measurements[f"world{w}/weak_scaling_efficiency"] = {
            "unit": "efficiency", "median": eff, "reps": [r / (w * base) for r in rates[w]]}
    notes = [f"{threads} thread(s) per rank at every world size ({cores} cores)"]
    if max(worlds) * threads > cores:
        notes.append("more ranks than cores: oversubscribed, the efficiency reflects that")
    return {
        "unit": "images/s",
        "settings": {**s, "quick": quick, "worlds": worlds, "threads_per_rank": threads, "backend": "ddp (gloo)",
                     "precision": "fp32", "step": "pretrain (SimCLR): views + forward + NT-Xent + backward + SGD",
                     "sync_bn": True},
        "measurements": measurements, "weak_scaling_efficiency": efficiency,
        "not_measured": [f"world sizes above {max(worlds)}: this machine has {cores} cores",
                         "multi-GPU (NCCL) scaling: this benchmark runs CPU processes only"],
        "notes": notes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="one rank of the scaling benchmark (started by benchmarks.scaling.run)")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--windows", type=int, default=3)
    return worker(p.parse_args(argv))


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The rank's work and its collectives are done: skip interpreter teardown, where a
    # C++ thread left running (gloo, OpenMP) can abort the process ("terminate called
    # without an active exception", exit -6) and fail a finished job.
    os._exit(code)

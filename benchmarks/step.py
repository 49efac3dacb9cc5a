"""Training-step throughput of the SimCLR stage: backends, precisions, compile, world size.

What is timed is the model step only (the two views already made): one forward of the
2B views, NT-Xent over the embeddings of all ranks, backward (DDP's or DeepSpeed's
gradient all-reduce included) and the optimizer update, on ResNet-18 (CIFAR variant,
width 64) at 32 px. Images/second counts source images of the global batch (each gives
two views).

Grid: backend ddp | deepspeed (ZeRO-0; bf16 through torch autocast, fp32 weights),
precision fp32 | bf16, torch.compile off | on, world size 1 | 2. On CPU the world sizes
share the machine's cores: world size 1 runs one process with all of them, world size
2 two gloo processes with half each, at the same global batch (strong scaling). Each
world size is a fresh set of spawned processes; inside it the configurations run in
turn, each with warm-up steps (compilation happens there) and then timed repetitions,
all kept.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

FULL = dict(global_batch=64, warmup=2, steps=3, reps=5, compile_everywhere=True)
QUICK = dict(global_batch=32, warmup=1, steps=2, reps=3, compile_everywhere=False)
DS_CONFIGS = {"fp32": "configs/deepspeed/zero0_fp32.json", "bf16": "configs/deepspeed/zero0_bf16.json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grid(world: int, quick: bool, cuda: bool) -> list[dict]:
    out = []
    for backend in ("ddp", "deepspeed"):
        for precision in ("fp32", "bf16"):
            for compile_ in (False, True):
                # torch.compile of a ResNet-18 forward+backward takes minutes on a small
                # CPU: the quick run compiles one configuration per world size.
                if compile_ and quick and not cuda and not (backend == "ddp" and precision == "fp32"):
                    continue
                out.append({"world": world, "backend": backend, "precision": precision, "compile": compile_})
    return out


def key(c: dict) -> str:
    return f"ws{c['world']}/{c['backend']}/{c['precision']}/{'compile' if c['compile'] else 'eager'}"


def _worker(rank: int, world: int, port: int, combos: list[dict], settings: dict, device: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, settings["cores"] // world))
    from engine.config import load_config
    from engine.losses.ntxent import nt_xent
    from engine.models import SimCLRModel
    from engine.runtime import launch
    from engine.runtime.backends import build_backend
    from engine.stages.pretrain import make_optimizer_factory

    base = [f"device={device}", "model.arch=cifar_resnet18", "model.width=64", "logging.progress=false",
            f"pretrain.batch_size={settings['global_batch']}", "distributed.backend=deepspeed",
            f"distributed.deepspeed_config={DS_CONFIGS['fp32']}"]
    # One process group for every configuration (DeepSpeed needs one even for 1 process).
    dist = launch.init_distributed(load_config(None, base))
    per_rank = settings["global_batch"] // world
    results = {}
    try:
        for c in combos:
            cfg = load_config(None, base + [f"distributed.backend={c['backend']}", f"precision={c['precision']}",
                                            f"distributed.compile={str(c['compile']).lower()}",
                                            f"distributed.deepspeed_config={DS_CONFIGS[c['precision']]}"])
            torch.manual_seed(0)
            model = SimCLRModel(cfg.model.arch, cfg.model.width, cfg.model.proj_hidden, cfg.model.proj_dim)
            backend = build_backend(model, make_optimizer_factory(cfg, cfg.pretrain.lr), cfg, dist,
                                    sync_bn=cfg.pretrain.sync_bn, per_rank_batch=per_rank)
            backend.train()
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(2 * per_rank, 3, 32, 32, generator=g).to(dist.device)
            x = x.contiguous(memory_format=torch.channels_last)

            def step() -> None:
                backend.zero_grad()
                z = backend.forward(x)
                loss = nt_xent(z[:per_rank], z[per_rank:], cfg.pretrain.temperature, cfg.pretrain.loss)
                backend.backward(loss)
                backend.step()

            def sync() -> None:
                if dist.device.type == "cuda":
                    torch.cuda.synchronize(dist.device)
                launch.barrier()

            t0 = time.perf_counter()
            for _ in range(settings["warmup"]):
                step()
            sync()
            warm = time.perf_counter() - t0
            reps = []
            for _ in range(settings["reps"]):
                sync()
                t0 = time.perf_counter()
                for _ in range(settings["steps"]):
                    step()
                sync()
                reps.append(settings["global_batch"] * settings["steps"] / (time.perf_counter() - t0))
            results[key(c)] = {"reps": reps, "warmup_seconds": round(warm, 2)}
            del backend, model
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(results))
        launch.shutdown()


def _run_world(world: int, combos: list[dict], settings: dict, device: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "res.json")
        mp.start_processes(_worker, args=(world, _free_port(), combos, settings, device, out), nprocs=world,
                           start_method="spawn", join=True)
        return json.loads(Path(out).read_text())


def run(quick: bool = False) -> dict:
    import statistics

    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = {**(QUICK if quick else FULL), "cores": cores}
    worlds = [1, 2] if (not cuda or torch.cuda.device_count() >= 2) else [1]
    # Spawned workers import the engine from this checkout, installed or not (the GPU
    # machine gets a bare copy of the tree).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    results, not_measured = {}, []
    for world in worlds:
        combos = grid(world, quick, cuda)
        t0 = time.time()
        raw = _run_world(world, combos, settings, device)
        for k, v in raw.items():
            v["median"] = statistics.median(v["reps"])
            results[k] = v
        print(f"[step] world size {world}: {len(combos)} configurations in {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
    if not cuda:
        not_measured.append("CUDA (no GPU in this run): NCCL, cuDNN channels_last and CUDA-graph/compile gains")
    if quick:
        not_measured.append("torch.compile beyond ddp/fp32 (quick mode: CPU compilation takes minutes each)")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"unit": "img/s", "what": "SimCLR model step (views precomputed), ResNet-18 CIFAR at 32 px",
            "device": torch.cuda.get_device_name(0) if cuda else "cpu", "settings": settings,
            "torch": torch.__version__, "load_average_1_5_15": load, "results": results,
            "not_measured": not_measured}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    args = p.parse_args(argv)
    res = run(quick=args.quick)
    text = json.dumps(res, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    for k, v in res["results"].items():
        print(f"{k:<32} {v['median']:8.1f} img/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Phase 4, ``stages``: every registered stage (a new defense's too, with no edit here) for
a few steps on the device over in-memory data, each with its own tiny settings; then a
1-rank NCCL group's all_reduce and barrier. That N processes follow one process is CI's
check, over gloo (tests/runtime/test_launchers.py)."""
from __future__ import annotations

import math
import tempfile

from benchmarks.gpu.data import memory_data
from benchmarks.gpu.plan import SIZES, cuda_only, device, checked_stages, mode
from benchmarks.gpu.progress import Progress


def stage_losses(cfg, name: str, dist, data, steps: int) -> dict:
    """The losses of the stage's first steps, and the labelled split of a stage that makes one."""
    from benchmarks import stages
    stage = stages.build(cfg, name, cfg.run_dir, dist, data)
    stage.on_epoch_start(0)
    batches = iter(stage.batches(0))
    try:
        losses = [float(stage.train_step(next(batches), 0, k)["loss"]) for k in range(steps)]
    finally:
        getattr(batches, "close", lambda: None)()
    out = {"losses": losses, "pass": all(math.isfinite(v) for v in losses)}
    split = getattr(getattr(stage, "split", None), "labelled", None)
    return out if split is None else {**out, "labelled": len(split)}


def nccl_probe(dev) -> dict:
    """DDP at world size 1 opens no process group (engine/runtime/launch.py), so the stages
    alone never reach NCCL: a 1-rank group does."""
    import torch
    import torch.distributed as td
    td.init_process_group("nccl", store=td.HashStore(), rank=0, world_size=1, device_id=dev)
    try:
        t = torch.arange(4, dtype=torch.float32, device=dev)
        td.all_reduce(t)
        td.barrier(device_ids=[dev.index])
        return {"all_reduce": t.tolist(), "pass": t.tolist() == [0.0, 1.0, 2.0, 3.0]}
    finally:
        td.destroy_process_group()


def run(smoke: bool, deadline: float, progress: str | None = None) -> dict:
    from engine.config import load_config
    from engine.runtime.launch import init_distributed, shutdown
    from engine.stages import STAGES
    p, dev, s = Progress(progress, deadline, cuda_only("stages", smoke)), device(smoke), SIZES[mode(smoke)]["stages"]
    # fp32 without TF32 and cuDNN's autotuning: the check is of the stages' code, not of cuDNN's choices.
    over = [o for name in checked_stages() for o in STAGES[name].tiny_overrides()] + s["overrides"] + [
        f"device={dev.type}", "distributed.tf32=false", "distributed.cudnn_benchmark=false", "logging.progress=false",
        "attack.name=none", f"run_dir={tempfile.mkdtemp(prefix='dbd-gpu-stages-')}"]
    cfg = load_config(None, over)
    dist = init_distributed(dev.type, cfg.distributed)
    data = memory_data(cfg, dist, s["n_train"], cfg.data.image_size)
    p.data.update(device=str(dist.device), stages=checked_stages())
    try:
        for name in checked_stages():
            p.case(name, lambda name=name: stage_losses(cfg, name, dist, data, s["steps"]))
    finally:
        shutdown()
    if dev.type == "cuda":
        p.case("nccl_probe", lambda: nccl_probe(dist.device))
    results = p.data["results"]
    p.data["passed"] = bool(results) and not p.data["skipped"] and all(r.get("pass") for r in results.values())
    return p.finish()

"""The real stage objects, built as ``dbd run`` builds them (``engine.pipeline.make_stage``),
over a benchmark data set; the linear and fine-tuning stages read an untrained upstream
model written into the benchmark's run dir with the files a finished stage leaves."""
from __future__ import annotations

import os
from pathlib import Path

from benchmarks.harness import REPO

DS_JSON = {p: str(REPO / "configs" / "deepspeed" / f"zero0_{p}.json") for p in ("fp32", "bf16", "fp16")}
BADNETS = ("attack.name=badnets", "attack.target=0", "attack.ratio=0.1", "attack.select_from=all",
           "attack.badnets.pattern=white3x3")


def config(root, *, preset=None, backend: str = "ddp", precision: str = "fp32", device: str = "cpu",
           width: int = 16, workers: int | None = 2, compile: bool = False, extra=()):
    """The run config over the prepared set at ``root``: ``preset``'s, or BadNets 10 %
    on the defaults; DeepSpeed gets the ZeRO-0 JSON of ``precision``. ``workers`` None
    keeps the preset's loader threads."""
    import json
    from engine.config import load_config
    if backend == "deepspeed" and device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    name = json.loads((Path(root) / "meta.json").read_text())["name"]
    over = [] if preset else list(BADNETS)
    over += [f"data.root={root}", f"data.name={name}", f"device={device}", f"precision={precision}",
             f"distributed.engine={backend}", f"distributed.deepspeed_config={DS_JSON[precision]}",
             f"distributed.compile={str(compile).lower()}", f"model.width={width}", "logging.progress=false"]
    over += [] if workers is None else [f"data.num_workers={workers}"]
    return load_config(preset, over + list(extra))


def open_run(cfg):
    """This process's DistInfo and RunData (the poisoned training set), as ``dbd run`` makes them.
    One process group serves every stage built afterwards: DeepSpeed keeps the group
    it first saw, and needs one even for a single process (so start with a DeepSpeed
    config when any stage will use it)."""
    from engine.attacks.runtime import build_poison
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta, RunData
    from engine.runtime.launch import init_distributed, shutdown
    shutdown()  # DistInfo is cached per process: start from nothing
    dist = init_distributed(cfg.device, cfg.distributed, cfg.runtime)
    meta = DatasetMeta.from_raw(load_meta(cfg.data.root))
    return dist, RunData(cfg.data, meta, dist, cfg.seed, build_poison(cfg, meta.raw, None))


def write_upstream(cfg, run_dir: Path, num_classes: int) -> None:
    """``pretrain`` and ``linear`` as finished stages leave them: model.pt and done.json,
    and the linear stage's Adam state (that of an Adam which took no step yet)."""
    import torch
    from engine.fsutil import torch_save, write_json
    from engine.models import Classifier, SimCLRModel
    from engine.rundir import DONE, MODEL
    from engine.runtime.checkpoint import save_final_model
    from engine.defenses.dbd.linear import OPTIMIZER
    m = cfg.model
    for stage, make in (("pretrain", lambda: SimCLRModel(m.arch, m.width, m.proj_hidden, m.proj_dim)),
                        ("linear", lambda: Classifier(m.arch, m.width, num_classes))):
        d = Path(run_dir) / stage
        if not (d / DONE).is_file():
            d.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(cfg.seed)
            save_final_model(d / MODEL, make())
            if stage == "linear":
                torch_save(d / OPTIMIZER, {})
            write_json(d / DONE, {"epochs": cfg.section(stage).epochs})


def build(cfg, name: str, run_dir: Path, dist, data):
    """Stage ``name``, built and in train mode, as the Trainer has it before its first epoch."""
    import torch
    from engine.pipeline import make_stage
    from engine.stages import stage_class
    if stage_class(name).needs:
        write_upstream(cfg, run_dir, data.meta.num_classes)
    stage = make_stage(cfg, name, run_dir=Path(run_dir), dist=dist, data=data)
    torch.manual_seed(cfg.seed)
    stage.build()
    stage.backend.train()
    return stage

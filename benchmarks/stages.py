"""The real stage objects, built as ``dbd run`` builds them (``engine.pipeline.make_stage``),
over a benchmark data set; the linear and fine-tuning stages read an untrained upstream
model written into the benchmark's run dir with the files a finished stage leaves."""
from __future__ import annotations

from pathlib import Path


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

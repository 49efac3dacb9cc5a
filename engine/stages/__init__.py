"""The DBD stages and the no-defense baseline; each module exposes ``run(ctx) -> dict``."""

STAGE_MODULES = {
    "supervised": "engine.stages.supervised",
    "pretrain": "engine.stages.pretrain",
    "linear": "engine.stages.linear",
    "finetune": "engine.stages.finetune",
}

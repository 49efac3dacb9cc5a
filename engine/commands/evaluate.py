"""``dbd evaluate CHECKPOINT CONFIG``: BA/ASR/RA of any model file under a config's data
and attack.

The checkpoint is a stage's ``model.pt`` or a plain state dict from elsewhere (see
``engine.stages.weights.fit_checkpoint``); the config's ``model`` section must describe
it. The test sets and the trigger are the config's, built exactly as a run builds them
(the poison plan is drawn into ``--work``, by default a temporary folder), and the
figures come from the same ``Evaluator`` every stage uses. One process.
"""
from __future__ import annotations

import argparse

from engine.commands.base import Command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a model file: a stage's model.pt or a state dict")
    p.add_argument("config", help="a run config: its data, attack and model sections are used")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. attack.name=blended")
    p.add_argument("--out", help="write the figures to this JSON file (default: print only)")
    p.add_argument("--work", help="folder for the poison plan (default: a temporary folder)")


def main(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from engine.config import load_config, to_dict
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta, RunData
    from engine.errors import UserError
    from engine.fsutil import write_json
    from engine.models import Classifier
    from engine.pipeline import check_dataset
    from engine.runtime.launch import init_distributed, shutdown
    from engine.runtime.precision import Precision
    from engine.stages.evaluate import Evaluator
    from engine.stages.weights import fit_checkpoint

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.root:
        raise UserError("config: data.root is empty: point it at a folder written by `dbd prepare`")
    meta = DatasetMeta.from_raw(load_meta(cfg.data.root))
    check_dataset(cfg, meta)
    model = Classifier(cfg.model.arch, cfg.model.width, meta.num_classes)
    fit_checkpoint(model, args.checkpoint, f"model.arch={cfg.model.arch} model.width={cfg.model.width} "
                                           f"with {meta.num_classes} classes")
    dist = init_distributed(cfg.device, cfg.distributed, cfg.runtime)
    try:
        with tempfile.TemporaryDirectory(prefix="dbd-evaluate-") as tmp:
            from engine.attacks.runtime import build_poison

            work = Path(args.work or tmp)
            work.mkdir(parents=True, exist_ok=True)
            data = RunData(cfg.data, meta, dist, cfg.seed, build_poison(cfg, meta.raw, work))
            figures = Evaluator(data, Precision(cfg.precision))(model.to(dist.device))
    finally:
        shutdown()
    record = {"checkpoint": str(Path(args.checkpoint).resolve()), "dataset": meta.name,
              "attack": to_dict(cfg.attack), "model": to_dict(cfg.model), "precision": cfg.precision, **figures}
    print("  ".join(f"{k} {figures[k]:.2f}" for k in ("BA", "ASR", "RA") if k in figures))
    if args.out:
        write_json(Path(args.out), record)
        print(f"written: {args.out}")
    else:
        print(json.dumps(figures))
    return 0


class EvaluateCommand(Command):
    name = "evaluate"
    help = "BA/ASR/RA of any model file under a config's data and attack"
    order = 3.5  # after run
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

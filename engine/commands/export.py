"""``dbd export RUN_DIR --stage finetune --format safetensors|torchscript``: a finished
stage's model, in a file other tools load without this engine, with a JSON beside it.

- ``safetensors``: ``model.safetensors``, the fp32 state dict of the classifier
  (backbone and linear head), loadable with ``safetensors.torch.load_file``; the
  architecture is named in the JSON.
- ``torchscript``: ``model.torchscript.pt``, the classifier traced with the
  normalisation inside, so ``torch.jit.load(path)(x)`` takes RGB float images in [0, 1],
  NCHW, at the run's image size, and returns logits.

``model.json`` holds the architecture (``model.arch``, ``model.width``, the number of
classes), the normalisation (mean, std), the input size, the class names in label order,
and where the weights came from (run dir, stage, the stage's BA/ASR/RA).
"""
from __future__ import annotations

import argparse

from engine.commands.base import Command

FORMATS = ("safetensors", "torchscript")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `dbd run`")
    p.add_argument("--stage", default="finetune", help="the finished stage whose model to export (default finetune)")
    p.add_argument("--format", choices=FORMATS, default="safetensors")
    p.add_argument("--out", help="output folder (default RUN_DIR/export/STAGE)")


def main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from engine.config import load_config
    from engine.data.prepare import load_meta
    from engine.data.run_data import DatasetMeta
    from engine.errors import UserError
    from engine.fsutil import atomic_path, write_json
    from engine.models import Classifier
    from engine.rundir import CONFIG, DONE, MODEL
    from engine.stages.weights import fit_checkpoint

    run_dir = Path(args.run_dir)
    stage_dir = run_dir / args.stage
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG})")
    if not (stage_dir / DONE).is_file() or not (stage_dir / MODEL).is_file():
        raise UserError(f"{stage_dir} holds no finished model ({DONE} and {MODEL}); finished stages: "
                        + ", ".join(sorted(p.parent.name for p in run_dir.glob(f"*/{MODEL}"))))
    cfg = load_config(run_dir / CONFIG)
    meta = DatasetMeta.from_raw(load_meta(cfg.data.root))
    model = Classifier(cfg.model.arch, cfg.model.width, meta.num_classes)
    fit_checkpoint(model, stage_dir / MODEL, f"the run's model.arch={cfg.model.arch} model.width={cfg.model.width}")
    model.eval()
    done = json.loads((stage_dir / DONE).read_text())
    out = Path(args.out) if args.out else run_dir / "export" / args.stage
    out.mkdir(parents=True, exist_ok=True)
    size = cfg.data.image_size
    info = {"format": args.format, "arch": cfg.model.arch, "width": cfg.model.width, "num_classes": meta.num_classes,
            "classes": list(meta.classes), "input": f"RGB float32 in [0, 1], NCHW, {size}x{size}",
            "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "normalised_inside": args.format == "torchscript",
            "source": {"run_dir": str(run_dir.resolve()), "stage": args.stage,
                       **{k: done[k] for k in ("BA", "ASR", "RA") if k in done}}}
    if args.format == "safetensors":
        from safetensors.torch import save_file

        path = out / "model.safetensors"
        state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"arch": cfg.model.arch, "width": str(cfg.model.width)})
    else:
        path = out / "model.torchscript.pt"
        wrapped = _with_normalisation(model, cfg.data.mean, cfg.data.std).eval()
        with torch.no_grad():
            traced = torch.jit.trace(wrapped, torch.rand(2, 3, size, size))
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
    info["file"] = path.name
    write_json(out / "model.json", info)
    print(f"exported {args.stage} of {run_dir} as {args.format}: {path} (+ model.json)")
    return 0


def _with_normalisation(model, mean, std):
    import torch

    class Normalised(torch.nn.Module):
        """The classifier with the run's normalisation in front: [0, 1] images in, logits out."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.register_buffer("mean", torch.tensor(list(mean)).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(list(std)).view(1, 3, 1, 1))

        def forward(self, x):
            return self.model((x - self.mean) / self.std)

    return Normalised()


class ExportCommand(Command):
    name = "export"
    help = "write a finished stage's model as safetensors or TorchScript, with its architecture and classes"
    order = 3.7  # after run and evaluate
    add_arguments = staticmethod(add_arguments)
    main = staticmethod(main)

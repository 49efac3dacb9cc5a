"""Child process for tests/stages/test_no_ffcv.py and test_deepspeed_stages.py.

``python -m tests.stages.stage_matrix MODE OUT.json`` blocks FFCV from being imported
(a ``sys.meta_path`` finder that raises ImportError for ``ffcv`` and ``ffcv.*``, in
place before anything of the engine is imported; only when run as that command, never
when a test imports this module for its constants), then:

- ``imports``: imports every module of ``kernels``, ``engine.models``, ``engine.losses``,
  ``engine.runtime`` and ``engine.stages``, and trains every stage for a few steps with
  DDP in fp32 on in-memory uint8 data (``engine.data.memory``);
- ``deepspeed``: the same steps for every stage under every shipped DeepSpeed JSON (and
  DeepSpeed's own bf16 mode, the CPU's stand-in for its fp16 one), next to DDP fp32.

Each run builds the real Stage through ``engine.pipeline.make_stage`` (as ``dbd run``
does), takes ``on_epoch_start`` (the split, for the fine-tuning stages) and STEPS
``train_step`` calls, then scores ``eval_module()`` with the real Evaluator. Errors are
recorded per run, not raised, so one broken combination does not hide the others.
A child process, because DeepSpeed keeps module-wide state tied to the first process
group it saw (tests/runtime/test_runtime_units.py runs one DeepSpeed case per process).
"""
from __future__ import annotations

import importlib
import importlib.abc
import json
import sys
import traceback
from pathlib import Path


class BlockFFCV(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ImportError(f"FFCV is blocked in this process (tried to import {name})")
        return None


REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "engine.models", "engine.losses", "engine.runtime", "engine.stages", "engine.defenses")
STEPS = 2
N_TRAIN, N_TEST, CLASSES = 64, 32, 10
# Width 4; each stage's own tiny batch sizes (Stage.tiny_overrides: batches of 16, 8 for
# fine-tuning, whose split halves hold 32 samples each).
BASE_TINY = ["device=cpu", "model.width=4", "model.proj_hidden=16", "model.proj_dim=8", "logging.progress=false",
             "attack.name=none", "data.horizontal_flip=false"]


def stage_names() -> tuple[str, ...]:
    """Every registered stage, each after those it needs (the matrix runs them in turn).
    A function, not a constant: the child must block FFCV before the engine is imported."""
    from engine.stages.base import stages_in_order

    return stages_in_order()


def tiny() -> list[str]:
    from engine.stages import STAGES

    return BASE_TINY + [o for name in stage_names() for o in STAGES[name].tiny_overrides()]


JSONS = ("zero0_fp32", "zero0_bf16", "zero1_bf16", "zero2_bf16", "zero0_fp16", "zero2_fp16")
NATIVE_BF16 = "zero2_bf16_native"  # zero2_fp16.json with DeepSpeed's own bf16 in place of its fp16


def import_all() -> dict:
    import pkgutil

    out = {}
    for pkg in PACKAGES:
        try:
            mod = importlib.import_module(pkg)
            names = [pkg] + [m.name for m in pkgutil.walk_packages(mod.__path__, prefix=f"{pkg}.")]
        except Exception as e:  # noqa: BLE001 - recorded for the test to name
            out[pkg] = f"{type(e).__name__}: {e}"
            continue
        for name in names:
            try:
                importlib.import_module(name)
                out[name] = "ok"
            except Exception as e:  # noqa: BLE001
                out[name] = f"{type(e).__name__}: {e}"
    return out


def memory_data(cfg, dist):
    import torch

    from engine.data.memory import MemoryData

    g = torch.Generator().manual_seed(1234)
    size = cfg.data.image_size
    train = (torch.randint(0, 256, (N_TRAIN, size, size, 3), dtype=torch.uint8, generator=g),
             torch.arange(N_TRAIN) % CLASSES)
    test = (torch.randint(0, 256, (N_TEST, size, size, 3), dtype=torch.uint8, generator=g),
            torch.arange(N_TEST) % CLASSES)
    return MemoryData(cfg.data, dist, cfg.seed, train=train, test=test, num_classes=CLASSES)


def run_stage(cfg, name: str, run_dir: Path, dist, data) -> dict:
    """STEPS steps of stage ``name``, then its evaluation; what the tests check."""
    import torch

    from benchmarks.stages import build
    from engine.stages.evaluate import Evaluator

    stage = build(cfg, name, run_dir, dist, data)
    module = stage.backend.module
    trainable = {k: p.detach().float().clone() for k, p in module.named_parameters() if p.requires_grad}
    dtypes = sorted({str(p.dtype) for p in module.parameters()})
    stage.on_epoch_start(0)
    losses = []
    it = iter(stage.batches(0))
    try:
        for step in range(STEPS):
            out = stage.train_step(next(it), 0, step)
            losses.append(float(out["loss"]))
    finally:
        it.close()
    after = dict(module.named_parameters())
    changed = sum(not torch.equal(after[k].detach().float(), v) for k, v in trainable.items())
    # SimCLR has no classifier to score (evaluates = False).
    ba = Evaluator(data, stage.env.precision)(stage.eval_module())["BA"] if stage.evaluates else None
    return {"losses": losses, "changed": changed, "trainable": len(trainable), "dtypes": dtypes, "BA": ba,
            "imported_ffcv": any(m == "ffcv" or m.startswith("ffcv.") for m in sys.modules)}


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the test prints it
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}


def ds_json(name: str, work: Path) -> tuple[str, str]:
    """(path, precision) of DeepSpeed config ``name``."""
    if name == NATIVE_BF16:
        ds = json.loads((REPO / "configs" / "deepspeed" / "zero2_fp16.json").read_text())
        del ds["fp16"]
        ds["bf16"] = {"enabled": True}
        path = work / f"{name}.json"
        path.write_text(json.dumps(ds))
        return str(path), "bf16"
    return str(REPO / "configs" / "deepspeed" / f"{name}.json"), name.split("_")[1]


def cpu_cannot_run(name: str, ds: dict) -> str | None:
    """Why this CPU cannot run DeepSpeed config ``ds``, or None."""
    from deepspeed.accelerator import get_accelerator

    if isinstance(ds.get("fp16"), dict) and ds["fp16"].get("enabled") and not get_accelerator().is_fp16_supported():
        return (f"{name}: DeepSpeed's own fp16 mode needs CPU fp16 kernels (oneDNN AVX512-FP16/AMX), which this "
                f"CPU lacks (DeepSpeed: 'Type fp16 is not supported on your device'); {NATIVE_BF16} runs the "
                f"same DeepSpeed-owned-precision path in bf16")
    return None


def main(mode: str, out: Path) -> None:
    from engine.config import load_config
    from engine.runtime.launch import init_distributed

    work = out.parent
    result: dict = {"ffcv_blocked": False}
    try:
        import ffcv  # noqa: F401
    except ImportError:
        result["ffcv_blocked"] = True
    if mode == "imports":
        result["imports"] = import_all()
    # One process group for every stage built here (DeepSpeed keeps the first it sees).
    TINY = tiny()
    base = load_config(None, TINY + ["distributed.engine=deepspeed"] if mode == "deepspeed" else TINY)
    dist = init_distributed(base.device, base.distributed, base.runtime)
    runs = {}
    cfg = load_config(None, TINY + [f"run_dir={work / 'ddp'}"])
    data = memory_data(cfg, dist)
    STAGES = stage_names()
    for name in STAGES:
        runs[f"ddp/{name}"] = _guarded(run_stage, cfg, name, work / "ddp", dist, data)
    if mode == "deepspeed":
        for js in JSONS + (NATIVE_BF16,):
            path, precision = ds_json(js, work)
            reason = cpu_cannot_run(js, json.loads(Path(path).read_text()))
            for name in STAGES:
                if reason:
                    runs[f"{js}/{name}"] = {"skip": reason}
                    continue
                over = [f"run_dir={work / js}", f"precision={precision}", "distributed.engine=deepspeed",
                        f"distributed.deepspeed_config={path}"]
                if js not in ("zero0_fp32", "zero0_bf16", "zero0_fp16"):
                    # ZeRO partitions and DeepSpeed's own 16-bit modes optimise flattened
                    # copies, so the linear stage's Adam cannot carry over (a documented refusal).
                    over.append("finetune.adam_from_linear=false")
                cfg = load_config(None, TINY + over)
                runs[f"{js}/{name}"] = _guarded(run_stage, cfg, name, work / js, dist, data)
    result["runs"] = runs
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    # Only in the child: the tests import this module for its constants, and must not
    # block FFCV for the rest of their session. Nothing of the engine is imported yet.
    sys.meta_path.insert(0, BlockFFCV())
    main(sys.argv[1], Path(sys.argv[2]))

"""What a stage's result depends on, as a hash: the key of a shared stage store.

Each stage declares ``depends_on`` beside its class: the dotted config keys its result
depends on, besides its own section (always included) and the stages it ``needs``
(whose keys are folded in, so a change upstream reruns everything below it). Some
entries are resolved rather than read verbatim, so that the key follows what the run
computes, not how the config spells it:

- ``dataset``: the prepared dataset's content hash from ``meta.json`` (not
  ``data.root``: the same data under another path is the same input);
- ``attack``: the attack's shared settings and the chosen attack's own section only
  (``attack.blended`` cannot change a BadNets run); ``attack.implant_threshold`` is a
  report setting and is left out;
- ``data.decode_device``: only when it is ``cuda`` (GPU-decoded pixels may differ
  from the CPU decode by a level); the default ``cpu`` adds nothing, so keys made
  before the setting existed still match;
- every setting that names a file (a config class's ``input_files``: the Blended
  pattern image, a BadNets pattern file, the label-consistent perturbation cache and
  surrogate) is keyed by the file's sha256, never by its path: a pattern replaced at
  the same path trains anew, the same bytes under another path are reused;
- numerics (every stage, from the run, not from its ``depends_on``): the device kind
  (cpu | cuda) and the training backend; on CUDA also ``distributed.tf32`` (TF32
  changes every fp32 matmul's and convolution's rounding) and
  ``distributed.cudnn_benchmark`` (cuDNN then picks each convolution's algorithm by
  timing, and algorithms round differently); on CPU neither changes anything, and the
  key says ``"cpu: no effect"``. Under DeepSpeed the key holds the DeepSpeed config's
  resolved **content** (gradient clipping, fp16 loss scaling and ZeRO settings live
  there), never its path.

What is left out (``SPEED_ONLY``) changes how fast a result comes, not what it is, so a
stage store reuses a stage across it: where the run is written, threads
(``runtime.threads``, ``data.num_workers``; the thread count a stage ran with is
recorded in its ``done.json``), progress and logging, the launcher's process-group
settings, compile and checkpoint cadence. The one runtime fact that changes a result is
the world size under ``distributed.batch_semantics: per_rank`` (the global batch grows
with it); it joins the key then. ``tests/sweep/test_stage_reads.py`` runs every stage
with a config that records each key read, and fails when a stage reads a key that is
neither in its key nor in ``SPEED_ONLY``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.fsutil import file_sha256
from engine.stages.base import STAGES, stage_class

# Where JPEG data is decoded: nvJPEG's pixels can differ from libjpeg's by a level, so
# cuda is in the key; cpu (the default) is left out, which keeps the keys of stores made
# before the setting existed.
DECODE_DEVICE = "data.decode_device"

# attack.* keys that are report settings, not inputs.
_ATTACK_REPORT_ONLY = ("implant_threshold",)

# Config keys (dotted prefixes) that change only speed, where results are written, or
# what is printed: no stage's key holds them. Each entry says why it is safe to share
# a stage across its values.
SPEED_ONLY: tuple[str, ...] = (
    "run_dir",  # where the run is written
    "stage_store",  # where shared stages live
    "stages",  # which stages run, not what each computes (upstream ones are in ``needs``)
    "runtime",  # torch's intra-op threads: the count is recorded in done.json (see docs/launchers.md)
    "data.num_workers",  # FFCV decoding threads: order and content are seeded per sample
    "data.os_cache",  # page-cache policy of the .beton reader
    "data.trigger_device",  # loader or device: the device twins are pixel-exact (tests/attacks)
    "distributed.process_group",  # gloo | nccl carries the same sums
    "distributed.timeout_s",  # how long a dead rank is waited for
    "distributed.checkpoint_every",  # resume is exact (tests/stages/test_stage_steps.py)
    "distributed.compile", "distributed.compile_mode",  # same graph (tests: compiled vs eager)
    "distributed.channels_last",  # memory layout of the same convolutions
    "logging",  # progress bar and metrics cadence
    "attack.implant_threshold",  # a report setting
)

# Numerics keys every stage's key holds (resolved in ``_numerics``), for the reads test.
NUMERICS: tuple[str, ...] = ("device", "distributed.engine", "distributed.deepspeed_config",
                             "distributed.tf32", "distributed.cudnn_benchmark")
ON_CPU = "cpu: no effect"


def _lookup(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"stage dependency {dotted!r} is not a config key")
        node = node[part]
    return node


def _file_digest(path: str, setting: str) -> dict:
    p = Path(path)
    if not p.is_file():
        # The stage would fail on it too; the key cannot stand for bytes that do not exist.
        return {"missing": True}
    try:
        return {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    except OSError as e:
        raise UserError(f"{setting}: cannot read {p} to key the stage store: {e}") from None


def _with_file_contents(section: dict, cls: type | None, dotted: str, run_dir: str) -> dict:
    """``section`` (of dataclass ``cls``) with every file it names (its class's
    ``input_files``, nested sections' too) replaced by the file's content digest."""
    import typing

    hints = typing.get_type_hints(cls) if cls is not None and dataclasses.is_dataclass(cls) else {}
    files = getattr(cls, "input_files", None)
    out = dict(section)
    for name, child in section.items():
        if isinstance(child, dict):
            out[name] = _with_file_contents(child, hints.get(name), f"{dotted}.{name}", run_dir)
    if files is not None:
        for name, path in files(section, run_dir).items():
            out[name] = {"file": _file_digest(path, f"{dotted}.{name}")}
    return out


def _attack_inputs(attack: dict, run_dir: str) -> dict:
    from engine.attacks import ATTACKS

    name = attack.get("name")
    if name not in ATTACKS:
        return {"name": name}  # a clean run: nothing else about the attack matters
    shared = {k: v for k, v in attack.items() if k not in ATTACKS and k not in _ATTACK_REPORT_ONLY}
    return {**shared, name: _with_file_contents(attack[name], ATTACKS[name].config_class, f"attack.{name}", run_dir)}


def resolve_device_type(cfg: dict) -> str:
    """cpu | cuda, as ``engine.runtime.launch`` resolves ``device`` in this process."""
    want = cfg.get("device", "auto")
    if want == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def deepspeed_content(distributed: dict) -> dict:
    """The DeepSpeed config as the backend will use it, less what the key holds elsewhere
    (batch sizes follow from the stage section and world size) or what only prints."""
    from types import SimpleNamespace

    from engine.runtime.backends import ds_precision, load_ds_config, resolve_ds_config

    raw = load_ds_config(distributed["deepspeed_config"])
    ds = resolve_ds_config(SimpleNamespace(**distributed), ds_precision(raw), per_rank_batch=1, world_size=1,
                           per_layer_optimizer=False)
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
              "steps_per_print", "wall_clock_breakdown"):
        ds.pop(k, None)
    return ds


def _numerics(cfg: dict, device_type: str) -> dict:
    dist = cfg["distributed"]
    out: dict[str, Any] = {"device": device_type, "distributed.engine": dist["engine"]}
    if dist["engine"] == "deepspeed":
        out["distributed.deepspeed_config"] = deepspeed_content(dist)
    cuda = device_type == "cuda"
    out["distributed.tf32"] = dist["tf32"] if cuda else ON_CPU
    out["distributed.cudnn_benchmark"] = dist["cudnn_benchmark"] if cuda else ON_CPU
    return out


def dependencies(cfg: dict, stage: str, *, dataset_hash: str, world_size: int = 1, device_type: str | None = None,
                 _seen: tuple[str, ...] = ()) -> dict:
    """The values stage ``stage``'s result depends on, from the plain-dict config ``cfg``
    (``engine.settings.to_dict``), upstream stages' keys included. ``device_type`` (cpu |
    cuda) is where the stage trains; None resolves the config's ``device`` here."""
    if stage in _seen:
        raise RuntimeError(f"stage dependency cycle: {' -> '.join(_seen + (stage,))}")
    device_type = device_type or resolve_device_type(cfg)
    cls = stage_class(stage)
    run_dir = str(cfg.get("run_dir", ""))
    deps: dict[str, Any] = {"stage": stage}
    for dotted in dict.fromkeys((*cls.depends_on, stage)):
        if dotted == "dataset":
            deps[dotted] = dataset_hash
        elif dotted == "attack":
            deps[dotted] = _attack_inputs(_lookup(cfg, "attack"), run_dir)
        elif dotted == DECODE_DEVICE and _lookup(cfg, dotted) == "cpu":
            continue  # the FFCV decode every key was computed with before the setting existed
        else:
            value = _lookup(cfg, dotted)
            # A stage's section may name files (its config class's ``input_files``).
            section_cls = STAGES[dotted].config_class if dotted in STAGES else None
            deps[dotted] = _with_file_contents(value, section_cls, dotted, run_dir) if isinstance(value, dict) \
                else value
    deps.update(_numerics(cfg, device_type))
    if _lookup(cfg, "distributed.batch_semantics") == "per_rank":
        deps["world_size"] = int(world_size)
    for upstream in cls.needs:
        deps[f"needs.{upstream}"] = stage_key(cfg, upstream, dataset_hash=dataset_hash, world_size=world_size,
                                              device_type=device_type, _seen=_seen + (stage,))
    return deps


def declared_prefixes(stage: str) -> tuple[str, ...]:
    """The dotted config keys (as prefixes) stage ``stage``'s key covers: its
    ``depends_on`` (``dataset`` = ``data.root`` and ``data.name``, resolved to the content
    hash), its own section, the numerics, and the same of every stage it needs."""
    cls = stage_class(stage)
    out: list[str] = []
    for dotted in (*cls.depends_on, stage, *NUMERICS):
        out += ["data.root", "data.name"] if dotted == "dataset" else [dotted]
    for upstream in cls.needs:
        out += declared_prefixes(upstream)
    return tuple(dict.fromkeys(out))


def digest(deps: dict) -> str:
    text = json.dumps(deps, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage_key(cfg: dict, stage: str, *, dataset_hash: str, world_size: int = 1, device_type: str | None = None,
              _seen: tuple[str, ...] = ()) -> str:
    """A hex digest of exactly what stage ``stage`` depends on."""
    return digest(dependencies(cfg, stage, dataset_hash=dataset_hash, world_size=world_size,
                               device_type=device_type, _seen=_seen))

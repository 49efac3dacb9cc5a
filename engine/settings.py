"""Config building blocks: the loader of typed dataclasses from YAML and ``a.b=c``
overrides, and the sections several components share (data, model, views,
distributed, logging).

Each stage's own section lives beside its class (``engine/stages/<stage>.py``) and
each attack's beside its attack (``engine/attacks/<attack>.py``); ``engine.config``
assembles the run's ``Config`` from these and the two registries.
Every default is the DBD reference setting (``shared/reference/dbd.md``, CIFAR-10,
ResNet-18); every deviation a preset makes is an explicit key in its YAML file.
Validation happens once, at load time, so a bad value fails before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError, check  # noqa: F401  (check is part of this module's API)
from kernels.specs import SimCLRSpec, WeakSpec

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


DECODE_DEVICES = ("cpu", "cuda")
TRIGGER_DEVICES = ("loader", "device")


@dataclass
class DataConfig:
    name: str = "cifar10"  # must equal the dataset name in ``<root>/meta.json``
    root: str = ""  # folder written by ``dbd prepare`` (train.beton, test.beton, meta.json)
    # FFCV decoding threads per process, capped at the cores per local rank (the cores
    # this process may run on divided by the ranks on its node); they never change torch's
    # threads (runtime.threads), so this setting changes only speed, never results.
    num_workers: int = 2
    image_size: int = 32  # training resolution of every view
    # Fixed size that variable-size (JPEG) datasets are decoded to before the views are
    # cut on the device; 0 means image_size (fixed-size raw datasets ignore it).
    decode_size: int = 0
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD
    horizontal_flip: bool = True  # off for data that is not mirror-symmetric (digits, GTSRB)
    os_cache: bool = True  # FFCV: map the whole .beton into the page cache
    # Where JPEG data is decoded: cpu (FFCV, libjpeg-turbo) | cuda (batched nvJPEG, the
    # trigger applied on the GPU: engine/data/gpu_decode.py). cuda needs variable-size JPEG
    # data and a CUDA run; its pixels may differ from the CPU decode by a level (nvJPEG's
    # IDCT), so it is part of every stage's key.
    decode_device: str = "cpu"
    # Where the trigger is drawn: loader (in FFCV's decoding threads, the default) |
    # device (on the run's device right after the batch arrives: engine/data/
    # device_trigger.py). The device twins are pixel-exact, so this changes only speed;
    # with decode_device=cuda the trigger is always drawn on the device.
    trigger_device: str = "loader"

    @property
    def decode_side(self) -> int:
        """The square variable-size data is decoded to (``decode_size``, or the image size)."""
        return self.decode_size or self.image_size

    def validate(self) -> None:
        check(self.num_workers >= 1, "data.num_workers", "must be >= 1")
        check(self.image_size >= 8, "data.image_size", "must be >= 8")
        check(self.decode_size == 0 or self.decode_size >= self.image_size,
               "data.decode_size", "must be 0 or >= data.image_size")
        check(all(s > 0 for s in self.std), "data.std", "must be positive")
        check(self.decode_device in DECODE_DEVICES, "data.decode_device",
              f"must be one of {', '.join(DECODE_DEVICES)}, got {self.decode_device!r}")
        check(self.trigger_device in TRIGGER_DEVICES, "data.trigger_device",
              f"must be one of {', '.join(TRIGGER_DEVICES)}, got {self.trigger_device!r}")


@dataclass
class ModelConfig:
    # A backbone of engine.models.BACKBONES: cifar_resnet18 | resnet18 | resnet50
    # (torchvision) | preact_resnet18 (BackdoorBench) | wrn16_1 (ABL). engine.config checks
    # it against the registry, which this layer cannot import.
    arch: str = "cifar_resnet18"
    # Each backbone's own rule (its module's docstring), 64 always the reference: the first
    # stage's channels for the ResNets, the last group's for wrn16_1 (a multiple of 4).
    width: int = 64
    proj_hidden: int = 512
    proj_dim: int = 128

    def validate(self) -> None:
        check(self.width >= 4, "model.width", "must be >= 4")


# The view sections are built from the kernels' specs (kernels/specs.py), the one place a
# view option is declared, defaulted and checked: a new spec field is a new config key.
# The data section sets what every view shares (image size, normalisation; and a
# horizontal flip off when data.horizontal_flip is false), so no view section repeats it.
_FROM_DATA = ("size", "mean", "std")
# Validation does not know data.image_size; a size this large checks everything else
# (engine.stages.views.simclr_spec checks the blur kernel against the real size).
_ANY_SIZE = 1 << 20


def _spec_fields(spec: type, only: tuple[str, ...] | None = None, defaults: dict | None = None) -> list:
    hints = typing.get_type_hints(spec)
    return [(f.name, hints[f.name], dataclasses.field(default=(defaults or {}).get(f.name, f.default)))
            for f in dataclasses.fields(spec) if f.name not in _FROM_DATA and (only is None or f.name in only)]


def _check_spec(spec: type, values: dict, prefix: str) -> None:
    """The spec's own checks, as one config error naming the key (its messages start with
    the field's name)."""
    try:
        spec(size=_ANY_SIZE, **values)
    except ValueError as e:
        raise UserError(f"config: {prefix}.{e}") from None


def _section(name: str, fields: list, doc: str, **methods) -> type:
    cls = dataclasses.make_dataclass(name, fields, namespace={"__doc__": doc, **methods})
    cls.__module__ = __name__  # pickling and error messages find it here
    return cls


def _spec_values(self, names: tuple[str, ...]) -> dict:
    """The named fields as a spec's keyword arguments (lists, as a caller may pass, as tuples)."""
    return {n: tuple(v) if isinstance(v, list) else v for n in names for v in [getattr(self, n)]}


def _simclr_validate(self, prefix: str) -> None:
    _check_spec(SimCLRSpec, self.spec_values(tuple(f.name for f in dataclasses.fields(self))), prefix)


SimCLRViewConfig = _section("SimCLRViewConfig", _spec_fields(SimCLRSpec),
                            "``pretrain.views``: every field of ``kernels.SimCLRSpec`` but size and normalisation.",
                            validate=_simclr_validate, spec_values=_spec_values)

# The weak view is pad-crop (kernels.WeakSpec; CIFAR's RandomCrop + padding) or resized
# crop (the SimCLR view with every colour op off; ImageNet). Its section holds the kind,
# every WeakSpec field, and the resized crop's scale and filter. padding_mode: reflect
# (the reference's linear and MixMatch views) | constant (zeros: its BadNets no-defense
# baseline, torchvision's RandomCrop default) | symmetric | edge. interpolation: bilinear
# (torchvision's RandomResizedCrop default) | bicubic (the reference's Blended baseline).
WEAK_KINDS = ("pad_crop", "resized_crop")
PAD_CROP_FIELDS = tuple(f.name for f in dataclasses.fields(WeakSpec) if f.name not in _FROM_DATA)
RESIZED_CROP_FIELDS = ("scale", "flip_p", "interpolation")


def _weak_validate(self, prefix: str) -> None:
    check(self.kind in WEAK_KINDS, f"{prefix}.kind", "must be pad_crop or resized_crop")
    _check_spec(WeakSpec, self.spec_values(PAD_CROP_FIELDS), prefix)
    _check_spec(SimCLRSpec, self.spec_values(RESIZED_CROP_FIELDS), prefix)




WeakViewConfig = _section(
    "WeakViewConfig",
    [("kind", str, dataclasses.field(default="pad_crop"))] + _spec_fields(WeakSpec)
    + _spec_fields(SimCLRSpec, only=("scale", "interpolation"), defaults={"interpolation": "bilinear"}),
    "The stages' weak view (``<stage>.view``): pad_crop (kernels.WeakSpec) or resized_crop.",
    validate=_weak_validate, spec_values=_spec_values)


@dataclass
class DistributedConfig:
    # The training engine: ddp | deepspeed (engine.runtime.backends.ENGINES). Its old name
    # ``backend`` still loads, with one deprecation warning (RENAMED below).
    engine: str = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero0_fp32.json"  # match precision when changing it
    # "global": stage batch sizes are the sum over ranks (divided by world size);
    # "per_rank": every rank takes the full configured batch.
    batch_semantics: str = "global"
    # Learning-rate scaling when the effective global batch differs from the
    # configured one: none | linear | sqrt.
    lr_scaling: str = "none"
    # torch.compile of the model every stage's step runs (forward and backward graphs).
    compile: bool = False
    # torch.compile's mode: default | reduce-overhead (adds CUDA graphs on CUDA: one
    # replay per step instead of a launch per kernel, for fixed-shape steps such as
    # MixMatch's many small ones) | max-autotune (also autotunes matmuls/convolutions).
    compile_mode: str = "default"
    channels_last: bool = True
    timeout_s: int = 600  # a dead rank ends the job after this many seconds
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints; 0 = epoch ends only
    # Gradient-norm clipping for both backends (0 = off, the reference). A DeepSpeed JSON
    # must agree or leave gradient_clipping out (DeepSpeed >= 0.19.3 defaults it to 1.0).
    grad_clip: float = 0.0
    # torch.distributed backend: auto (NCCL on CUDA, gloo on CPU) | nccl | gloo. gloo on
    # CUDA lets several processes share one GPU (NCCL refuses that), e.g. to check
    # multi-process behaviour on a single GPU.
    process_group: str = "auto"
    # CUDA only (a CPU run leaves both alone): cuDNN picks the fastest convolution per
    # shape (every shape is fixed), and TF32 tensor cores for fp32 matmuls and
    # convolutions (Ampere+; 10-bit mantissa: tf32=false keeps fp32 numerics throughout).
    cudnn_benchmark: bool = True
    tf32: bool = True

    RENAMED: typing.ClassVar[dict[str, str]] = {"backend": "engine"}

    def validate(self) -> None:
        # distributed.engine is checked against the engines' registry by engine.config
        # (engine.runtime.backends.ENGINES), which a config section cannot import.
        check(self.compile_mode in ("default", "reduce-overhead", "max-autotune"), "distributed.compile_mode",
              f"must be default, reduce-overhead or max-autotune, got {self.compile_mode!r}")
        check(self.process_group in ("auto", "nccl", "gloo"), "distributed.process_group",
              f"unknown process group {self.process_group!r}: must be auto, nccl or gloo")
        check(self.batch_semantics in ("global", "per_rank"), "distributed.batch_semantics",
               "must be global or per_rank")
        check(self.lr_scaling in ("none", "linear", "sqrt"), "distributed.lr_scaling", "must be none, linear or sqrt")
        check(self.timeout_s >= 10, "distributed.timeout_s", "must be >= 10")
        check(self.grad_clip >= 0, "distributed.grad_clip", "must be >= 0 (0 = off)")
        check(self.checkpoint_every >= 0, "distributed.checkpoint_every", "must be >= 0")


@dataclass
class RuntimeConfig:
    # torch's intra-op (CPU) threads in every process, set once by the engine when the
    # process group exists (engine.runtime.threads); FFCV no longer changes them, so
    # data.num_workers changes only speed. 0 = the cores this process may run on
    # (os.sched_getaffinity) divided by the ranks on its node, at least 1: ranks never
    # oversubscribe the node. On a CPU the count changes float rounding, so results are
    # reproducible for a fixed count; every stage's done.json records it (cost.torch_threads).
    # Inter-op threads are left to torch (they can be set only once per process).
    threads: int = 0

    def validate(self) -> None:
        check(self.threads >= 0, "runtime.threads", f"must be >= 0 (0 = cores per local rank), got {self.threads}")


@dataclass
class LoggingConfig:
    progress: bool = True  # a progress bar with images/second, rank 0 only
    # Off a terminal (a log file, Slurm output, CI) the bar is one plain line per stage
    # every this many seconds instead of carriage-return frames.
    progress_interval_s: float = 30.0
    # Every scalar of metrics.jsonl also as TensorBoard events in <run_dir>/tensorboard/: live
    # while the run trains (engine/report/live.py), then one file rebuilt with the report
    # (engine/report/tensorboard.py); needs the tensorboard extra.
    tensorboard: bool = False
    # off | offline | online: the same scalars to Weights & Biases while the run trains
    # (engine/report/live.py; the wandb extra). Offline runs land in <run_dir>/wandb/.
    wandb: str = "off"
    wandb_project: str = "dbd-engine"
    wandb_entity: str = ""  # empty: the account's default
    log_every: int = 10  # steps between metrics.jsonl step records
    # Backbone features of a 1,000-image sample saved by each stage (features.npz) for the
    # report's t-SNE map of where poisoned samples sit. The map costs seconds per stage on
    # a CPU; a many-cell sweep that only needs its leaderboard can turn it off.
    feature_map: bool = True

    def validate(self) -> None:
        check(self.progress_interval_s > 0, "logging.progress_interval_s", "must be > 0")
        check(self.wandb in ("off", "offline", "online"), "logging.wandb", "must be off, offline or online")



# --------------------------------------------------------------------------- loading



def parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


class ConfigDeprecationWarning(FutureWarning):
    """A renamed config key was used (shown by default, unlike DeprecationWarning)."""


def _renamed(cls: type, raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A section's old key names (``RENAMED = {old: new}`` on its class) read as the new
    ones, with one warning each; both given is one error."""
    renamed = getattr(cls, "RENAMED", {})
    if not any(old in raw for old in renamed):
        return raw
    raw = dict(raw)
    for old, new in renamed.items():
        if old not in raw:
            continue
        if new in raw:
            raise UserError(f"config: {prefix}{old} is the old name of {prefix}{new}: give only {prefix}{new}")
        warnings.warn(f"config: {prefix}{old} is deprecated, use {prefix}{new}", ConfigDeprecationWarning,
                      stacklevel=2)
        raw[new] = raw.pop(old)
    return raw


def from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
    raw = _renamed(cls, raw, prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {prefix + near[0]!r}?" if near else f"; known keys: {', '.join(fields)}"
            raise UserError(f"config: unknown key {full!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, full)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise UserError(f"config: {key} must have {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise UserError(f"config: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config: {key} must be a string, got {value!r}")
    raise UserError(f"config: {key} has an unsupported type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (tuples become lists) for YAML/JSON output."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)



def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); one clear error for a missing
    file, bad YAML or another top-level type. ``what`` names the file in the errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{what} {path} is not valid YAML: {e}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{what} {path} must hold a mapping at the top level")
    return loaded


def load_raw(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The YAML file (if any) as a mapping, with ``dotted.key=value`` overrides applied."""
    raw: dict[str, Any] = read_yaml_mapping(path, "config file") if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like dotted.key=value")
        set_dotted(raw, key.strip(), parse_scalar(value))
    return raw


def current_key(dotted: str) -> str:
    """A dotted key under its current name (``distributed.backend`` -> ``distributed.engine``),
    for code that compares keys before the config is loaded (a grid's axes)."""
    section, _, key = dotted.partition(".")
    renamed = getattr({"distributed": DistributedConfig}.get(section), "RENAMED", {})
    return f"{section}.{renamed[key]}" if key in renamed else dotted

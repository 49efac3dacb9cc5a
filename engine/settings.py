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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError, check  # noqa: F401  (check is part of this module's API)

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
    arch: str = "cifar_resnet18"  # cifar_resnet18 | resnet18 | resnet50 (torchvision-style)
    width: int = 64  # channels of the first stage; 64 is ResNet-18 proper
    proj_hidden: int = 512
    proj_dim: int = 128

    def validate(self) -> None:
        check(self.arch in ("cifar_resnet18", "resnet18", "resnet50"), "model.arch",
               "must be cifar_resnet18, resnet18 or resnet50")
        check(self.width >= 4, "model.width", "must be >= 4")


@dataclass
class SimCLRViewConfig:
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    flip_p: float = 0.5  # forced to 0 when data.horizontal_flip is false
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # 0 (the reference, MoCo's PIL GaussianBlur(radius=sigma)): each sample's kernel has
    # 2*ceil(3*sigma)+1 taps, capped by the image; an odd n: torchvision's fixed n taps.
    blur_kernel_size: int = 0

    def validate(self, prefix: str) -> None:
        check(0 < self.scale[0] <= self.scale[1] <= 1, f"{prefix}.scale", "must satisfy 0 < lo <= hi <= 1")
        check(0 < self.ratio[0] <= self.ratio[1], f"{prefix}.ratio", "must satisfy 0 < lo <= hi")
        check(self.interpolation in ("bicubic", "bilinear"), f"{prefix}.interpolation",
               "must be bicubic or bilinear")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"{prefix}.{name}", f"must be in [0, 1], got {v}")
        check(0 <= self.hue <= 0.5, f"{prefix}.hue", "must be in [0, 0.5]")
        check(0 < self.blur_sigma[0] <= self.blur_sigma[1], f"{prefix}.blur_sigma", "must satisfy 0 < lo <= hi")
        k = self.blur_kernel_size
        check(k == 0 or (k > 0 and k % 2 == 1), f"{prefix}.blur_kernel_size",
              f"must be 0 (per-sample 2*ceil(3*sigma)+1 taps, the reference) or a positive odd number, got {k}")




@dataclass
class WeakViewConfig:
    kind: str = "pad_crop"  # pad_crop (CIFAR: RandomCrop + padding) | resized_crop (ImageNet)
    padding: int = 4
    # pad_crop's fill: reflect (the reference's linear and MixMatch views) | constant (zeros:
    # its BadNets no-defense baseline, torchvision's RandomCrop default) | symmetric | edge
    padding_mode: str = "reflect"
    scale: tuple[float, float] = (0.2, 1.0)  # resized_crop only
    # resized_crop's filter: bilinear (torchvision's RandomResizedCrop default) | bicubic
    # (the reference's Blended no-defense baseline)
    interpolation: str = "bilinear"
    flip_p: float = 0.5

    def validate(self, prefix: str) -> None:
        check(self.kind in ("pad_crop", "resized_crop"), f"{prefix}.kind", "must be pad_crop or resized_crop")
        check(self.padding >= 0, f"{prefix}.padding", "must be >= 0")
        check(self.padding_mode in ("reflect", "constant", "symmetric", "edge"), f"{prefix}.padding_mode",
              "must be reflect, constant, symmetric or edge")
        check(0 < self.scale[0] <= self.scale[1] <= 1, f"{prefix}.scale", "must satisfy 0 < lo <= hi <= 1")
        check(self.interpolation in ("bicubic", "bilinear"), f"{prefix}.interpolation",
              "must be bicubic or bilinear")
        check(0.0 <= self.flip_p <= 1.0, f"{prefix}.flip_p", f"must be in [0, 1], got {self.flip_p}")




@dataclass
class DistributedConfig:
    backend: str = "ddp"  # ddp | deepspeed
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

    def validate(self) -> None:
        check(self.backend in ("ddp", "deepspeed"), "distributed.backend",
               f"unknown backend {self.backend!r}: must be ddp or deepspeed")
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
    log_every: int = 10  # steps between metrics.jsonl step records
    # Backbone features of a 1,000-image sample saved by each stage (features.npz) for the
    # report's t-SNE map of where poisoned samples sit. The map costs seconds per stage on
    # a CPU; a many-cell sweep that only needs its leaderboard can turn it off.
    feature_map: bool = True

    def validate(self) -> None:
        check(self.progress_interval_s > 0, "logging.progress_interval_s", "must be > 0")



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


def from_dict(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"config: {prefix or 'top level'} must be a mapping, got {type(raw).__name__}")
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

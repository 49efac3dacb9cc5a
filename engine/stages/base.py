"""What a stage is: the ``Stage`` base class, the registry, and what a stage is handed.

A stage declares what differs between stages and nothing else:

- ``name`` (its folder under the run dir and its config section), ``config_class``
  (the dataclass of that section, defined beside the stage), ``label`` (how reports
  name its results), ``defense`` (which defense it belongs to, "none" for the
  baseline), ``evaluates`` (whether BA/ASR/RA are scored after each epoch),
  ``needs`` (earlier stages it reads), ``default_position`` (its place in the default
  ``stages`` list, None when it is opt-in), ``depends_on`` (the config keys its result
  depends on besides its own section and its ``needs``: a stage store reruns it when
  one of them changes and reuses it otherwise, engine.stages.keys);
- ``build()``: model, backend, loaders, views; it sets ``backend``, ``epochs``,
  ``steps_per_epoch`` and ``images_per_step``;
- ``batches(epoch)``, ``on_epoch_start(epoch)``, and one training step in two halves:
  ``prepare(batch, epoch, step)`` (what happens to a loader batch on the device: the
  copy and the views) and ``update(inputs, epoch, step)`` (forward, loss, backward,
  optimizer); ``train_step`` is the two in turn, and benchmarks time each half of the
  real step;
- ``state_dict()`` / ``load_state_dict()`` for what a checkpoint must carry beyond the
  backend's model and optimizer, and ``eval_module()``.

Everything else (seed, checkpoints and resume, the loop, progress, metrics, the final
evaluation, the atomic save, the summary) belongs to ``engine.stages.trainer.Trainer``.

Subclasses register themselves by defining ``name``; ``engine.stages`` imports every
module of the package, so a new stage is one new file.
"""
from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

from torch import nn

from engine.errors import UserError
from engine.registry import Registered, Registry
from engine.rundir import DONE, MODEL

if TYPE_CHECKING:  # the types only; importing them at run time would pull in FFCV and numba
    from engine.attacks.runtime import PoisonRuntime
    from engine.data.run_data import RunData
    from engine.report.metrics import MetricsWriter
    from engine.runtime.launch import DistInfo
    from engine.runtime.precision import Precision
    from engine.settings import DistributedConfig, ModelConfig

STAGES: Registry = Registry("stage")

# The inputs every stage's result depends on, for ``depends_on``: the prepared dataset
# (its content hash, not its path), the data settings the views read, the attack (the
# chosen attack's settings only), the model, the seed, the precision, and the
# distributed settings that change the arithmetic rather than its speed.
# engine.stages.keys resolves "dataset" and "attack".
INPUTS: tuple[str, ...] = (
    "dataset", "data.image_size", "data.decode_size", "data.decode_device", "data.mean", "data.std",
    "data.horizontal_flip",
    "attack", "model", "seed", "precision",
    "distributed.batch_semantics", "distributed.lr_scaling", "distributed.grad_clip")


@dataclass
class StageEnv:
    """What the Trainer hands a stage besides its own config section: the few shared
    facts it needs, typed, and the run's shared components."""

    name: str
    run_dir: Path
    seed: int
    precision: Precision
    dist: DistInfo
    data: RunData
    poison: PoisonRuntime | None  # None for clean data
    model: ModelConfig  # the ``model`` config section
    distributed: DistributedConfig  # the ``distributed`` config section
    metrics: MetricsWriter  # with stage=name

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def num_classes(self) -> int:
        return self.data.meta.num_classes

    def upstream_model(self, stage: str) -> Path:
        """The final weights of an earlier stage, which must be complete."""
        d = self.run_dir / stage
        if not (d / DONE).is_file() or not (d / MODEL).is_file():
            raise UserError(f"stage {self.name!r} needs the finished {stage!r} stage: "
                            f"{d / MODEL} is missing (add {stage!r} to stages, or run it first)")
        return d / MODEL

    def upstream_summary(self, stage: str) -> dict:
        self.upstream_model(stage)
        return json.loads((self.run_dir / stage / DONE).read_text())


class Stage(Registered, abc.ABC):
    registry = STAGES
    name: ClassVar[str]
    config_class: ClassVar[type]
    label: ClassVar[str]
    defense: ClassVar[str]
    evaluates: ClassVar[bool] = True
    needs: ClassVar[tuple[str, ...]] = ()
    default_position: ClassVar[int | None] = None
    depends_on: ClassVar[tuple[str, ...]]  # every registered stage declares it

    # Set by build():
    backend: Any
    epochs: int
    steps_per_epoch: int
    images_per_step: int  # images one step trains on, over all ranks (images/second)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if "name" in cls.__dict__ and "depends_on" not in cls.__dict__:
            raise RuntimeError(f"stage {cls.name!r} must declare depends_on (what its result depends on)")
        super().__init_subclass__(**kwargs)  # Registered: a class with a name joins STAGES

    def __init__(self, config: Any, env: StageEnv):
        self.config = config
        self.env = env

    @classmethod
    def tiny_overrides(cls) -> list[str]:
        """Config overrides that make this stage tiny enough for the tests (batch sizes
        that a few dozen samples fill): the stage matrix, the host-sync test and the GPU
        check loop over the registry with these, so a new stage is tested there without
        editing them."""
        return []

    # ---- what every stage defines
    @abc.abstractmethod
    def build(self) -> None:
        """Model, backend, loaders and views; sets backend, epochs, steps_per_epoch, images_per_step."""

    @abc.abstractmethod
    def batches(self, epoch: int) -> Iterable:
        """Epoch ``epoch``'s batches, the same ones in the same order on every call."""

    @abc.abstractmethod
    def prepare(self, batch: Any, epoch: int, step: int) -> Any:
        """A loader batch on the device, with its views cut: the inputs of ``update``."""

    @abc.abstractmethod
    def update(self, inputs: Any, epoch: int, step: int) -> dict:
        """Forward, loss, backward and optimizer step on prepared inputs; the step's metrics
        as floats or 0-d tensors, the same keys on every rank."""

    def train_step(self, batch: Any, epoch: int, step: int) -> dict:
        """One optimizer step on one loader batch."""
        return self.update(self.prepare(batch, epoch, step), epoch, step)

    # ---- optional hooks
    def on_epoch_start(self, epoch: int) -> None:
        """Runs before an epoch's first step, also when a resume lands in the middle of it
        (after ``load_state_dict``): state it derives must be kept in ``state_dict``."""

    def state_dict(self) -> dict:
        """The stage's own state for checkpoints (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def eval_module(self) -> nn.Module:
        """The model that evaluation scores and the stage saves as ``model.pt``."""
        return self.backend.module

    def feature_backbone(self) -> nn.Module | None:
        """A backbone whose features the report maps in 2-D, or None."""
        return None

    def summary(self) -> dict:
        """Extra values for ``done.json``."""
        return {}

    def save_outputs(self, stage_dir: Path) -> None:
        """Rank 0, after training: files a later stage reads, besides ``model.pt``
        (write them atomically, e.g. with ``engine.fsutil.torch_save``)."""

    # ---- checks on the config alone (preflight, before any work)
    @classmethod
    def batch_size(cls, config: Any) -> int:
        return int(config.batch_size)

    @classmethod
    def per_layer_optimizer(cls, config: Any) -> bool:
        """True when the optimizer needs whole layers (LARS): DeepSpeed must not flatten them."""
        return False


def default_stages() -> tuple[str, ...]:
    """The stages a config runs when it does not list them: every stage with a position."""
    placed = [c for c in STAGES.values() if c.default_position is not None]
    return tuple(c.name for c in sorted(placed, key=lambda c: c.default_position))


def stages_in_order() -> tuple[str, ...]:
    """Every registered stage, each after the stages it ``needs`` (ties: the default
    order first, then by name): an order in which each stage's inputs already exist."""
    def rank(c: type[Stage]) -> tuple:
        return (c.default_position is None, c.default_position or 0, c.name)

    done: list[str] = []
    pending = sorted(STAGES.values(), key=rank)
    while pending:
        ready = [c for c in pending if all(n in done for n in c.needs)]
        if not ready:
            raise RuntimeError(f"stages with unmet or circular needs: {', '.join(c.name for c in pending)}")
        done.append(ready[0].name)
        pending.remove(ready[0])
    return tuple(done)


def stage_class(name: str) -> type[Stage]:
    return STAGES.lookup(name)

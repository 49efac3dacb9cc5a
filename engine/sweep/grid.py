"""A sweep's grid file, checked whole before any work, and the cells it expands to.

A grid file names a ``base`` config, optional ``overrides`` (dotted keys applied to
every cell), a ``grid`` of dotted keys to lists of values (``defense`` picks the
stages: ``none`` is the no-defense baseline, ``dbd`` the defense; see
``defense_stages``), and an optional ``slurm`` section for ``dbd sweep --slurm``::

    base: configs/cifar10/badnets_dbd.yaml
    overrides:
      data.root: /data/cifar10
    grid:
      attack.name: [badnets, blended, wanet]
      attack.ratio: [0.01, 0.05, 0.1]
      defense: [none, dbd]
      seed: [0, 1, 2]

Every cell's config is loaded and validated when the grid is loaded, so an unknown
key, an empty list or a value of the wrong type fails before the first cell starts,
with the key named.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError
from engine.settings import current_key

DEFENSE = "defense"
# Keys a grid may not vary: the sweep sets the first two per cell, and the process
# group (made once for the whole sweep) is built from the rest.
FIXED_BY_SWEEP = ("run_dir", "stage_store", "stages")
FIXED_PER_SWEEP = ("device", "distributed.engine", "distributed.process_group", "distributed.timeout_s")
TOP_KEYS = ("base", "overrides", "grid", "slurm")


def defense_stages(defense: str) -> tuple[str, ...]:
    """The stages of a defense: those whose ``defense`` it is, with everything they need,
    in dependency order (``dbd``: pretrain, linear, finetune; ``none``: supervised)."""
    from engine.stages import STAGES

    mine = [c for c in STAGES.values() if c.defense == defense]
    # A defense's default stages when it has some (dbd: not the opt-in finetune_labelled).
    placed = sorted((c for c in mine if c.default_position is not None), key=lambda c: c.default_position)
    own = placed or mine
    order: list[str] = []

    def visit(name: str) -> None:
        for need in STAGES[name].needs:
            visit(need)
        if name not in order:
            order.append(name)

    for c in own:
        visit(c.name)
    return tuple(order)


def known_defenses() -> tuple[str, ...]:
    from engine.stages import STAGES

    return tuple(dict.fromkeys(c.defense for c in STAGES.values()))


@dataclass
class SlurmConfig:
    nodes: int = 1
    tasks_per_node: int = 1  # ranks per node: one per GPU on a GPU node
    gpus_per_task: int = 0  # 0 on CPU nodes
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str = ""
    account: str = ""
    python: str = ""  # the interpreter the tasks run; empty = the one that wrote the script
    extra: tuple[str, ...] = ()  # more "#SBATCH" options, e.g. "--mem=64G"


@dataclass
class Cell:
    index: int
    name: str
    values: dict[str, Any]  # the grid's values for this cell, in grid order
    defense: str | None  # None when the grid has no ``defense`` key
    config: Any  # the resolved Config (run_dir and stage_store still the base's)


@dataclass
class Grid:
    path: Path
    base: Path
    overrides: dict[str, Any]
    axes: dict[str, list]
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    cells: list[Cell] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return list(self.axes)


def _fail(path: Path, msg: str) -> UserError:
    return UserError(f"grid file {path}: {msg}")


def _mapping(raw: Any, path: Path, where: str) -> dict:
    if raw is None:
        return {}
    if isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        raw = {k.strip(): yaml.safe_load(v) for k, _, v in (x.partition("=") for x in raw)}
    if not isinstance(raw, dict):
        raise _fail(path, f"{where} must be a mapping of dotted keys to values")
    bad = [k for k in raw if not isinstance(k, str) or not k]
    if bad:
        raise _fail(path, f"{where}: key {bad[0]!r} is not a dotted config key")
    return raw


def _slug(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() \
        if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "_"


def cell_names(axes: dict[str, list], combos: list[tuple]) -> list[str]:
    """``attack.name=badnets, seed=0`` -> ``attack.name-badnets__seed-0``."""
    names = ["__".join(f"{k}-{_slug(v)}" for k, v in zip(axes, combo)) for combo in combos]
    if len(set(names)) != len(names):  # values that differ only in characters the slug drops
        names = [f"{i:03d}-{n}" for i, n in enumerate(names)]
    return names


def load_grid(path: str | Path) -> Grid:
    """The grid file, every cell's config loaded and validated (nothing runs)."""
    from engine.config import load_config
    from engine.settings import read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path, "grid file")
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise _fail(path, f"unknown top-level key {unknown[0]!r}: known keys are {', '.join(TOP_KEYS)}")
    if not isinstance(raw.get("base"), str) or not raw["base"]:
        raise _fail(path, "base must name a config file, e.g. base: configs/cifar10/badnets_dbd.yaml")
    base = Path(raw["base"])
    if not base.is_absolute() and not base.is_file() and (path.parent / base).is_file():
        base = path.parent / base  # relative to the grid file when not to the working folder
    if not base.is_file():
        raise _fail(path, f"base config not found: {raw['base']}")
    overrides = _mapping(raw.get("overrides"), path, "overrides")
    axes = _mapping(raw.get("grid"), path, "grid")
    if not axes:
        raise _fail(path, "grid is empty: list at least one dotted key with its values")
    for key in FIXED_BY_SWEEP:
        if key in overrides or key in axes:
            raise _fail(path, f"{key} is set by the sweep for each cell; leave it out")
    for key in FIXED_PER_SWEEP:
        if key in map(current_key, axes):
            raise _fail(path, f"grid key {key!r} cannot vary within one sweep (the process group is made once "
                              "for all cells); set it in overrides, or run one sweep per value")
    for key, values in axes.items():
        if not isinstance(values, list):
            raise _fail(path, f"grid key {key!r} must list its values, e.g. {key}: [a, b]")
        if not values:
            raise _fail(path, f"grid key {key!r} has an empty list of values")
        if len({yaml.safe_dump(v) for v in values}) != len(values):
            raise _fail(path, f"grid key {key!r} lists a value twice")
    if DEFENSE in overrides:
        raise _fail(path, "defense belongs in grid (it picks each cell's stages), not in overrides")
    if DEFENSE in axes:
        known = known_defenses()
        for d in axes[DEFENSE]:
            if d not in known:
                raise _fail(path, f"grid key 'defense': unknown defense {d!r}; known: {', '.join(known)}")
    slurm = _slurm(raw.get("slurm"), path)

    grid = Grid(path=path, base=base, overrides=overrides, axes=axes, slurm=slurm)
    combos = list(itertools.product(*axes.values()))
    for i, (combo, name) in enumerate(zip(combos, cell_names(axes, combos))):
        values = dict(zip(axes, combo))
        defense = values.get(DEFENSE)
        settings = {**overrides, **{k: v for k, v in values.items() if k != DEFENSE}}
        if defense is not None:
            settings["stages"] = list(defense_stages(defense))
        try:
            cfg = load_config(base, values=settings)
        except UserError as e:
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise _fail(path, f"cell {name} ({where}): {e}") from None
        grid.cells.append(Cell(index=i, name=name, values=values, defense=defense, config=cfg))
    return grid


def _slurm(raw: Any, path: Path) -> SlurmConfig:
    from engine.settings import from_dict

    if raw is None:
        return SlurmConfig()
    try:
        return from_dict(SlurmConfig, raw, prefix="slurm.")
    except UserError as e:
        raise _fail(path, str(e)) from None

"""The attack of a run: its plan, its triggers, and the loader operations built from them.

``build_poison`` is called once per process. The pipeline calls it on rank 0 first
(which draws the plan, or loads and verifies the saved one, and writes it), then,
after a barrier, on the other ranks, which find the saved plan and load it; the draw
is deterministic anyway, so every rank would agree even without the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.attacks import ATTACKS
from engine.attacks.base import Attack, AttackContext
from engine.attacks.config import NONE
from engine.attacks.plan import PLAN_FILE, PoisonPlan, make_plan, plan_settings, verify_plan
from engine.errors import UserError


def frame_of(cfg, meta: dict) -> tuple[int, int]:
    """The grid triggers are defined on: the image size of fixed-size data, else the
    square the loader decodes variable-size data to."""
    if meta.get("fixed_size"):
        train = meta["splits"]["train"]
        return int(train["height"][0]), int(train["width"][0])
    side = cfg.data.decode_side
    return side, side


def smallest_window(cfg, meta: dict) -> tuple[int, int]:
    """The smallest image region a trigger is drawn on, over both splits and modes."""
    if meta.get("fixed_size"):
        sizes = [(int(s["height"][0]), int(s["width"][0])) for s in meta["splits"].values()]
        return min(sizes)
    # Variable-size data is triggered after its resize, on the decode-size frame.
    side = cfg.data.decode_side
    return side, side


def _split_labels(root: str, split: str) -> np.ndarray:
    from engine.data.beton import BetonSummary
    from engine.data.loaders import beton_path

    return BetonSummary(beton_path(root, split)).labels


def make_attack(cfg, frame: tuple[int, int], plan: PoisonPlan, run_dir: Path | None, meta: dict, *,
                train: bool) -> Attack | None:
    """The configured attack (None for ``none``), from the registry: each attack class
    builds itself from its own section."""
    a = cfg.attack
    if a.name == NONE:
        return None
    if a.name not in ATTACKS:
        raise UserError(f"config: unknown attack.name {a.name!r}")
    ctx = AttackContext(frame=frame, plan=plan, train=train, run_dir=run_dir, meta=meta, seed=int(a.seed))
    return ATTACKS[a.name].from_config(a.section, ctx)


class PoisonRuntime:
    """What stages use: ``plan``, ``target``, ``train_ops()``, ``test_ops()``,
    ``poisoned_test_indices``; previews and exports also use the attacks themselves."""

    def __init__(self, cfg, meta: dict, run_dir: Path | None, plan: PoisonPlan, test_labels: np.ndarray):
        self.cfg = cfg
        self.meta = meta
        self.run_dir = run_dir
        self.plan = plan
        self.target = int(plan.target)
        self.name = cfg.attack.name
        self.frame = frame_of(cfg, meta)
        self.test_labels = np.asarray(test_labels, dtype=np.int64)
        # The attack's target of every test image: one class for all-to-one attacks,
        # (y + 1) mod C for all-to-all (BackdoorBench's ASR over every test image).
        self.all_to_all = plan.settings.get("label_mode") == "all_to_all"
        n_classes = int(meta["num_classes"])
        if self.all_to_all:
            self.test_targets = (self.test_labels + 1) % n_classes
        else:
            self.test_targets = np.full(len(self.test_labels), self.target, dtype=np.int64)
        if self.name == NONE:
            self.poisoned_test_indices = np.zeros(0, dtype=np.int64)
        else:
            # Images already of their target class say nothing about the trigger; for
            # all-to-all no image is of its target, so the whole test set counts.
            self.poisoned_test_indices = np.flatnonzero(self.test_labels != self.test_targets).astype(np.int64)
        # Built now so a bad trigger setting (a missing pattern file, a trigger that
        # does not fit) fails before any stage starts.
        self._test_attack = make_attack(cfg, self.frame, plan, run_dir, meta, train=False)
        self._train_attack: Attack | None = None
        if self._test_attack is not None:
            self._test_attack.check_fits(*smallest_window(cfg, meta))

    @property
    def train_selected(self) -> np.ndarray:
        """Training samples that get a trigger: the poisoned ones and WaNet's noise ones."""
        return self.plan.poisoned | self.plan.noise

    def train_attack(self) -> Attack | None:
        if self._train_attack is None and self.name != NONE:
            if ATTACKS[self.name].per_sample_training:
                # Per-sample variants (noise grids, perturbations) exist only in training.
                self._train_attack = make_attack(self.cfg, self.frame, self.plan, self.run_dir, self.meta,
                                                 train=True)
            else:
                self._train_attack = self._test_attack
        return self._train_attack

    def test_attack(self) -> Attack | None:
        return self._test_attack

    def train_ops(self):
        from engine.attacks.ops import AttackOps

        attack = self.train_attack()
        if attack is None:
            return None
        changed = bool((self.plan.labels != self.plan.true_labels).any())
        return AttackOps(attack, self.train_selected, self.plan.labels if changed else None)

    def device_ops(self, split: str):
        """The poisoning of ``split`` for ``data.decode_device: cuda``: the attack's device
        twin (engine.attacks.device.DevicePoison), None for clean data."""
        from engine.attacks.device import DevicePoison

        return DevicePoison.of(self, split)

    def test_ops(self):
        from engine.attacks.ops import AttackOps

        if self._test_attack is None:
            return None
        return AttackOps(self._test_attack, np.ones(len(self.test_labels), dtype=bool))

    def describe(self) -> str:
        p = self.plan
        if self.name == NONE:
            return "attack none: clean training set"
        extra = f", {int(p.noise.sum())} noise-mode samples" if p.noise.any() else ""
        return (f"attack {self.name}: {int(p.poisoned.sum())}/{len(p.poisoned)} training samples poisoned "
                f"({p.settings['label_mode']}, target {self.target}){extra}; "
                f"{len(self.poisoned_test_indices)} test images in the poisoned test set"
                f"{' (all-to-all: each scored against y+1 mod C)' if self.all_to_all else ''}")


def build_poison(cfg, meta: dict, run_dir: Path | str | None, *, save: bool = True) -> PoisonRuntime:
    """The run's attack. With ``run_dir``: reuse and verify ``poison_plan.npz`` there, or
    draw the plan and save it (atomically; ``save=False`` keeps it in memory, for
    read-only commands). Without: draw it in memory only."""
    a = cfg.attack
    n_classes = int(meta["num_classes"])
    if a.name != NONE and not 0 <= a.target < n_classes:
        raise UserError(f"config: attack.target {a.target} is outside the class range 0-{n_classes - 1} "
                        f"of {meta.get('name')}")
    if not cfg.data.root:
        raise UserError("config: data.root is empty: point it at a folder written by `dbd prepare`")
    train_labels = _split_labels(cfg.data.root, "train")
    test_labels = _split_labels(cfg.data.root, "test")
    expected = int(meta["splits"]["train"]["count"])
    if len(train_labels) != expected:
        raise UserError(f"{cfg.data.root}/train.beton has {len(train_labels)} samples but meta.json says "
                        f"{expected}: prepare the dataset again")
    settings = plan_settings(a)
    run_dir = Path(run_dir) if run_dir is not None else None
    path = run_dir / PLAN_FILE if run_dir is not None else None
    fresh = path is None or not path.is_file()
    if fresh:
        plan = make_plan(train_labels, n_classes, settings, content_hash=meta["content_hash"],
                         dataset=str(meta.get("name", "")))
    else:
        plan = PoisonPlan.load(path)
        verify_plan(plan, settings, meta["content_hash"], len(train_labels), path)
    runtime = PoisonRuntime(cfg, meta, run_dir, plan, test_labels)
    # Saved only once the triggers are known to build: a plan records the trigger
    # settings, and a half-valid one would block the corrected config.
    if fresh and run_dir is not None and save:
        plan.save(run_dir, meta.get("classes"))
    return runtime


def runtime_for_command(cfg, *, save: bool) -> PoisonRuntime:
    """The attack of a config for the attack commands (preview, export, attack-prepare).

    They share the run's plan when the run directory has one; ``save`` says whether a
    new plan may be written there (attack-prepare: yes; the read-only commands: no).
    """
    from engine.data.prepare import load_meta

    if not cfg.data.root:
        raise UserError("config: data.root is empty: point it at a folder written by `dbd prepare`")
    meta = load_meta(cfg.data.root)
    if meta.get("name") != cfg.data.name:
        raise UserError(f"config is for dataset {cfg.data.name!r} but {cfg.data.root} holds "
                        f"{meta.get('name')!r}: set data.name or data.root")
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    if run_dir is not None and not save and not run_dir.is_dir():
        run_dir = None
    return build_poison(cfg, meta, run_dir, save=save)

"""Who is poisoned, and their new labels: a pure, seeded function, saved with the run.

Modes (``attack.label_mode``; SIG and label-consistent force clean_label):

- all_to_one: ``select_from: non_target`` draws ``round(ratio * |non-target|)``
  samples from those whose label is not the target, the DBD reference's population
  (the reference flips a coin per sample, which gives this count in expectation);
  ``select_from: all`` draws ``round(ratio * N)`` from all samples (BackdoorBench).
  Chosen samples get the target label.
- all_to_all: ``round(ratio * N)`` from all samples; label y -> (y + 1) mod C.
- clean_label: only target-class samples, labels unchanged; the count is
  ``round(ratio * N)`` (``clean_label_ratio_of: dataset``, BackdoorBench) or
  ``round(ratio * |target class|)`` (``class``, BackdoorBox).

WaNet's noise mode adds ``round(cross_ratio * poisoned)`` samples drawn from the rest:
they get the warp with a noisy grid and keep their labels.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import UserError
from engine.fsutil import write_bytes, write_json
from engine.rundir import NO_ATTACK

PLAN_FILE = "poison_plan.npz"
SUMMARY_FILE = "poison_plan.json"
FORMAT = 1


@dataclass
class PoisonPlan:
    poisoned: np.ndarray  # bool[N]: gets the trigger (and the new label)
    labels: np.ndarray  # int64[N]: labels after poisoning
    true_labels: np.ndarray  # int64[N]
    noise: np.ndarray  # bool[N]: WaNet noise-mode samples (trigger variant, true label)
    target: int
    settings: dict = field(default_factory=dict)  # what the selection depends on
    content_hash: str = ""
    dataset: str = ""

    @property
    def poisoned_indices(self) -> np.ndarray:
        return np.flatnonzero(self.poisoned)

    @property
    def noise_indices(self) -> np.ndarray:
        return np.flatnonzero(self.noise)

    def summary(self, classes: list[str] | None = None) -> dict:
        n = len(self.true_labels)
        pois = self.poisoned_indices
        per_class = np.bincount(self.true_labels[pois], minlength=int(self.true_labels.max(initial=0)) + 1)
        changed = self.labels != self.true_labels
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "content_hash": self.content_hash,
            "settings": self.settings,
            "num_samples": int(n),
            "target": int(self.target),
            "target_name": classes[self.target] if classes and 0 <= self.target < len(classes) else None,
            "poisoned": int(len(pois)),
            "poisoned_fraction": round(len(pois) / max(n, 1), 6),
            "labels_changed": int(changed.sum()),
            "noise": int(self.noise.sum()),
            "poisoned_per_true_class": {str(c): int(k) for c, k in enumerate(per_class) if k},
            "first_poisoned_indices": pois[:20].tolist(),
        }

    def save(self, run_dir: str | Path, classes: list[str] | None = None) -> None:
        run_dir = Path(run_dir)
        buf = io.BytesIO()
        np.savez(buf, poisoned=self.poisoned, labels=self.labels, true_labels=self.true_labels,
                 noise=self.noise, target=np.int64(self.target),
                 header=np.frombuffer(json.dumps({"settings": self.settings, "content_hash": self.content_hash,
                                                  "dataset": self.dataset, "format": FORMAT}).encode(), np.uint8))
        write_bytes(run_dir / PLAN_FILE, buf.getvalue())
        write_json(run_dir / SUMMARY_FILE, self.summary(classes))

    @classmethod
    def load(cls, path: str | Path) -> "PoisonPlan":
        path = Path(path)
        try:
            with np.load(path) as z:
                header = json.loads(bytes(z["header"]).decode())
                return cls(poisoned=z["poisoned"].astype(bool), labels=z["labels"].astype(np.int64),
                           true_labels=z["true_labels"].astype(np.int64), noise=z["noise"].astype(bool),
                           target=int(z["target"]), settings=header["settings"],
                           content_hash=header["content_hash"], dataset=header["dataset"])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path} is not a readable poison plan ({e}): delete it to draw a new one") from None


def plan_settings(attack) -> dict:
    """The attack settings the selection depends on, as recorded in the plan."""
    mode = "clean_label" if attack.clean_label else attack.label_mode
    from engine.attacks import ATTACKS

    cross_ratio = ATTACKS[attack.name].noise_cross_ratio(attack.section) if attack.name in ATTACKS else 0.0
    return {
        "attack": attack.name,
        "label_mode": mode,
        "select_from": (attack.select_from if mode == "all_to_one"
                        else ("target_class" if mode == "clean_label" else "all")),
        "clean_label_ratio_of": attack.clean_label_ratio_of if mode == "clean_label" else None,
        "ratio": float(attack.ratio),
        "target": int(attack.target),
        "seed": int(attack.seed),
        "noise_cross_ratio": float(cross_ratio),
        # Not used by the selection, but stages trained with one trigger must not be
        # resumed with another.
        "trigger": trigger_settings(attack),
    }


def trigger_settings(attack) -> dict | None:
    from engine.attacks import ATTACKS

    if attack.name not in ATTACKS:
        return None
    return ATTACKS[attack.name].trigger_settings(attack.section)


def make_plan(true_labels: np.ndarray, num_classes: int, settings: dict, *, content_hash: str = "",
              dataset: str = "") -> PoisonPlan:
    """The plan for ``settings`` (see :func:`plan_settings`) over ``true_labels``."""
    y = np.asarray(true_labels, dtype=np.int64)
    n = len(y)
    target, ratio, mode = int(settings["target"]), float(settings["ratio"]), settings["label_mode"]
    if not 0 <= target < num_classes:
        raise UserError(f"config: attack.target {target} is outside the class range 0-{num_classes - 1}")
    if not 0.0 < ratio <= 1.0:
        raise UserError(f"config: attack.ratio must be in (0, 1], got {ratio}")
    poisoned = np.zeros(n, dtype=bool)
    noise = np.zeros(n, dtype=bool)
    labels = y.copy()
    if settings["attack"] == NO_ATTACK:
        return PoisonPlan(poisoned, labels, y, noise, target, settings, content_hash, dataset)
    # Selection and noise draws come from separate streams of one seed, so turning
    # noise mode on does not move the poisoned set.
    rng_select, rng_noise = (np.random.default_rng(s) for s in np.random.SeedSequence(settings["seed"]).spawn(2))
    if mode == "all_to_one":
        pool = np.flatnonzero(y != target) if settings["select_from"] == "non_target" else np.arange(n)
        count = int(round(ratio * len(pool)))
        what = "non-target samples" if settings["select_from"] == "non_target" else "samples"
    elif mode == "all_to_all":
        pool = np.arange(n)
        count = int(round(ratio * n))
        what = "samples"
    elif mode == "clean_label":
        pool = np.flatnonzero(y == target)
        count = int(round(ratio * (n if settings["clean_label_ratio_of"] == "dataset" else len(pool))))
        what = f"samples of the dataset (clean-label: from the {len(pool)} of target class {target})"
        if count > len(pool):
            raise UserError(f"config: attack.ratio {ratio} of the dataset is {count} clean-label samples but "
                            f"target class {target} has only {len(pool)}: lower the ratio or set "
                            f"attack.clean_label_ratio_of: class")
    else:
        raise UserError(f"config: unknown attack.label_mode {mode!r}")
    if count == 0:
        raise UserError(f"config: attack.ratio {ratio} poisons no sample of {len(pool)} {what}")
    chosen = np.sort(rng_select.choice(pool, size=count, replace=False))
    poisoned[chosen] = True
    if mode == "all_to_one":
        labels[chosen] = target
    elif mode == "all_to_all":
        labels[chosen] = (y[chosen] + 1) % num_classes
    cross = float(settings.get("noise_cross_ratio", 0.0))
    if cross > 0:
        rest = np.flatnonzero(~poisoned)
        n_noise = min(int(round(cross * count)), len(rest))
        noise[np.sort(rng_noise.choice(rest, size=n_noise, replace=False))] = True
    return PoisonPlan(poisoned, labels, y, noise, target, settings, content_hash, dataset)


def verify_plan(plan: PoisonPlan, settings: dict, content_hash: str, n: int, path: Path) -> None:
    """A saved plan must belong to this dataset and these attack settings."""
    fix = f"use a new run_dir or delete {path}"
    if plan.content_hash != content_hash:
        raise UserError(f"{path} was drawn for another dataset ({plan.dataset or '?'}, hash "
                        f"{plan.content_hash[:12]}); data.root holds hash {content_hash[:12]}: {fix}")
    if len(plan.true_labels) != n:
        raise UserError(f"{path} covers {len(plan.true_labels)} samples, the training set has {n}: {fix}")
    for key, value in settings.items():
        if plan.settings.get(key) != value:
            raise UserError(f"{path} was drawn with {key}={plan.settings.get(key)!r}, the config now says "
                            f"{value!r}: {fix}")

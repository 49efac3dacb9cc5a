"""The ``attack`` config section: the settings every attack shares, plus one section per
registered attack (``attack.<name>``), each defined beside its attack class.

A new attack is one new file in this folder: its ``Attack`` subclass (with ``name`` and
``config_class``) registers itself, and its section appears here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from engine.attacks import ATTACKS
from engine.errors import check
from engine.rundir import NO_ATTACK

NONE = NO_ATTACK  # a clean run: no attack


class _AttackConfigBase:
    def validate(self) -> None:
        names = (NONE, *ATTACKS)
        check(self.name in names, "attack.name", f"must be one of {', '.join(names)}")
        check(0.0 < self.ratio <= 1.0, "attack.ratio", f"must be in (0, 1], got {self.ratio}")
        check(self.target >= 0, "attack.target", "must be >= 0")
        check(self.label_mode in ("all_to_one", "all_to_all", "clean_label"), "attack.label_mode",
              "must be all_to_one, all_to_all or clean_label")
        check(self.select_from in ("non_target", "all"), "attack.select_from", "must be non_target or all")
        check(self.clean_label_ratio_of in ("dataset", "class"), "attack.clean_label_ratio_of",
              "must be dataset or class")
        check(0.0 <= self.implant_threshold <= 100.0, "attack.implant_threshold", "must be a percentage in [0, 100]")
        for name in ATTACKS:
            getattr(self, name).validate()

    @property
    def clean_label(self) -> bool:
        return (self.name in ATTACKS and ATTACKS[self.name].clean_label) or self.label_mode == "clean_label"

    @property
    def section(self) -> Any:
        """The chosen attack's own section (None for ``none``)."""
        return getattr(self, self.name) if self.name in ATTACKS else None


def _attack_config_class() -> type:
    shared = [
        ("name", str, field(default="badnets")),  # none, or a registered attack
        ("target", int, field(default=3)),  # DBD reference target class
        ("ratio", float, field(default=0.05)),
        # all_to_one | all_to_all; clean-label attacks (sig, label_consistent) force clean_label
        ("label_mode", str, field(default="all_to_one")),
        # Dirty-label draw: "non_target" (DBD reference, from samples whose label is not the
        # target) or "all" (BackdoorBench: round(ratio * N) from all samples).
        ("select_from", str, field(default="non_target")),
        # Clean-label ratio relative to "dataset" (BackdoorBench) or "class" (BackdoorBox).
        ("clean_label_ratio_of", str, field(default="dataset")),
        ("seed", int, field(default=0)),
        # A no-defense ASR below this (percent) means the backdoor did not implant, and the
        # report says that a defense's low ASR then proves nothing.
        ("implant_threshold", float, field(default=50.0)),
    ]
    sections = [(name, cls.config_class, field(default_factory=cls.config_class)) for name, cls in ATTACKS.items()]
    made = dataclasses.make_dataclass("AttackConfig", shared + sections, bases=(_AttackConfigBase,))
    made.__module__ = __name__
    return made


AttackConfig = _attack_config_class()

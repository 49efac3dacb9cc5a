"""Did the backdoor implant? The no-defense baseline of the same run says.

A defense's low ASR only means something when the attack works without the defense:
a backdoor that never implanted gives ASR ~0 with or without any defense. The
baseline is a finished stage whose ``done.json`` says ``"defense": "none"`` and has an
``ASR``; the attack counts as implanted when that ASR reaches ``attack.implant_threshold``
(percent, default 50) of the run's ``config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.rundir import NO_ATTACK, NO_DEFENSE

DEFAULT_THRESHOLD = 50.0
# The stage that runs the no-defense baseline, named when a run has none.
BASELINE_STAGE = "supervised"


@dataclass(frozen=True)
class Implant:
    attack: str | None
    threshold: float
    baseline_stage: str | None = None
    baseline_asr: float | None = None

    @property
    def applies(self) -> bool:
        """A clean run (attack "none") has no backdoor to implant."""
        return self.attack != NO_ATTACK

    @property
    def implanted(self) -> bool | None:
        if not self.applies or self.baseline_asr is None:
            return None
        return self.baseline_asr >= self.threshold

    def summary_fields(self) -> dict:
        return {"attack_implanted": self.implanted, "implant_baseline_asr": self.baseline_asr,
                "implant_baseline_stage": self.baseline_stage, "implant_threshold": self.threshold}

    def row_note(self) -> str | None:
        """The warning on each defense row when the attack did not implant."""
        if self.implanted is not False:
            return None
        return (f"attack did not implant (no-defense ASR {self.baseline_asr:.2f}% < {self.threshold:g}%): "
                "this ASR says nothing about the defense")

    def table_note(self) -> str | None:
        """The sentence under the results table."""
        if not self.applies:
            return None
        if self.baseline_asr is None:
            return ("No no-defense baseline was run (no finished stage's done.json says `\"defense\": \"none\"` "
                    "with an ASR), so this report cannot tell whether the attack implanted: a defense's low ASR "
                    f"may only mean the backdoor never took. Run the stage `{BASELINE_STAGE}` "
                    f"too (`stages: [{BASELINE_STAGE}, ...]`, as in configs/demo/digits_badnets_dbd.yaml "
                    f"or configs/cifar10/*_none.yaml).")
        if self.implanted:
            return (f"The attack implanted: the no-defense baseline (`{self.baseline_stage}`) reached "
                    f"ASR {self.baseline_asr:.2f}% >= {self.threshold:g}% (attack.implant_threshold).")
        return (f"**The attack did not implant**: the no-defense baseline (`{self.baseline_stage}`) reached only "
                f"ASR {self.baseline_asr:.2f}% < {self.threshold:g}% (attack.implant_threshold), so a defense's "
                "ASR on this attack says nothing about the defense.")


def threshold_of(cfg: dict) -> float:
    attack = cfg.get("attack") or {}
    value = attack.get("implant_threshold") if isinstance(attack, dict) else None
    return DEFAULT_THRESHOLD if value is None else float(value)


def assess(cfg: dict, stages: dict[str, dict], order: list[str]) -> Implant:
    """``stages``: stage name -> done.json; ``order``: the stage names in report order.
    The first finished no-defense stage with an ASR is the baseline."""
    attack = cfg.get("attack") or {}
    name = attack.get("name") if isinstance(attack, dict) else None
    threshold = threshold_of(cfg)
    for stage in order:
        done = stages[stage]
        if done.get("defense") == NO_DEFENSE and done.get("ASR") is not None:
            return Implant(name, threshold, stage, float(done["ASR"]))
    return Implant(name, threshold)

"""Poison plans: exact counts, populations, labels, determinism, save/verify."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest

from engine.attacks.plan import PLAN_FILE, SUMMARY_FILE, PoisonPlan, make_plan, plan_settings, verify_plan
from engine.attacks.config import AttackConfig
from engine.errors import UserError

C = 10
# 10 classes of unequal sizes (40..85), shuffled, so ratios of classes and of the whole differ.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(C), np.arange(40, 90, 5)))


def settings(**kw) -> dict:
    sub = {k: kw.pop(k) for k in list(kw) if "." in k}
    a = AttackConfig(**kw)
    for key, value in sub.items():
        part, field = key.split(".")
        setattr(getattr(a, part), field, value)
    a.validate()
    return plan_settings(a)


def plan_for(**kw) -> PoisonPlan:
    return make_plan(LABELS, C, settings(**kw), content_hash="h" * 64, dataset="synthetic")


def test_all_to_one_non_target_draws_only_non_target_samples():
    p = plan_for(name="badnets", target=3, ratio=0.1, select_from="non_target")
    non_target = int((LABELS != 3).sum())
    assert p.poisoned.sum() == round(0.1 * non_target)
    assert not (p.poisoned & (LABELS == 3)).any()
    assert (p.labels[p.poisoned] == 3).all()
    assert np.array_equal(p.labels[~p.poisoned], LABELS[~p.poisoned])
    assert np.array_equal(p.true_labels, LABELS)
    assert not p.noise.any()


def test_all_to_one_from_all_counts_the_whole_set_and_may_hit_the_target_class():
    p = plan_for(name="badnets", target=0, ratio=0.5, select_from="all")
    assert p.poisoned.sum() == round(0.5 * len(LABELS))
    assert (p.poisoned & (LABELS == 0)).any()  # 0.5 of 625 samples cannot miss class 0's 40
    assert (p.labels[p.poisoned] == 0).all()
    assert np.array_equal(p.labels[~p.poisoned], LABELS[~p.poisoned])


def test_all_to_all_shifts_labels_by_one():
    p = plan_for(name="blended", ratio=0.2, label_mode="all_to_all")
    assert p.poisoned.sum() == round(0.2 * len(LABELS))
    assert np.array_equal(p.labels[p.poisoned], (LABELS[p.poisoned] + 1) % C)
    assert np.array_equal(p.labels[~p.poisoned], LABELS[~p.poisoned])


@pytest.mark.parametrize("ratio_of, expected", [("dataset", round(0.05 * len(LABELS))),
                                                 ("class", round(0.5 * int((LABELS == 7).sum())))])
def test_clean_label_poisons_target_class_only_and_keeps_labels(ratio_of, expected):
    ratio = 0.05 if ratio_of == "dataset" else 0.5
    p = plan_for(name="sig", target=7, ratio=ratio, clean_label_ratio_of=ratio_of)
    assert p.poisoned.sum() == expected
    assert (LABELS[p.poisoned] == 7).all()
    assert np.array_equal(p.labels, LABELS)
    assert p.settings["label_mode"] == "clean_label"


def test_label_mode_clean_label_applies_to_any_attack():
    p = plan_for(name="badnets", target=2, ratio=0.5, label_mode="clean_label", clean_label_ratio_of="class")
    assert (LABELS[p.poisoned] == 2).all() and np.array_equal(p.labels, LABELS)


def test_wanet_noise_samples_are_disjoint_and_keep_labels():
    p = plan_for(name="wanet", ratio=0.1)
    n = int(p.poisoned.sum())
    assert p.noise.sum() == round(2.0 * n)
    assert not (p.noise & p.poisoned).any()
    assert np.array_equal(p.labels[p.noise], LABELS[p.noise])
    # Noise mode off leaves the poisoned set where it was (separate random streams).
    q = plan_for(name="wanet", ratio=0.1, **{"wanet.noise": False})
    assert not q.noise.any() and np.array_equal(q.poisoned, p.poisoned)


def test_none_poisons_nothing():
    p = plan_for(name="none")
    assert not p.poisoned.any() and np.array_equal(p.labels, LABELS)


def test_same_seed_same_plan_other_seed_other_plan():
    a, b = plan_for(name="badnets", seed=5), plan_for(name="badnets", seed=5)
    c = plan_for(name="badnets", seed=6)
    assert np.array_equal(a.poisoned, b.poisoned) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.poisoned, c.poisoned)
    assert a.poisoned.sum() == c.poisoned.sum()


def _digest(p: PoisonPlan) -> str:
    return hashlib.sha256(p.poisoned.tobytes() + p.labels.tobytes() + p.noise.tobytes()).hexdigest()


def test_plan_is_identical_in_another_process():
    code = ("import tests.attacks.test_attack_plan as t\n"
            "print(t._digest(t.plan_for(name='wanet', seed=11, ratio=0.07)))\n")
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == _digest(plan_for(name="wanet", seed=11, ratio=0.07))


@pytest.mark.parametrize("kw, message", [
    (dict(target=10), "outside the class range"),
    (dict(name="sig", target=3, ratio=0.5), "has only"),
    (dict(ratio=0.0001), "poisons no sample"),
])
def test_bad_plans_are_one_line_user_errors(kw, message):
    s = plan_settings(AttackConfig(**{"name": "badnets", **kw}))
    with pytest.raises(UserError) as e:
        make_plan(LABELS, C, s)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(UserError, match="attack.ratio"):
        AttackConfig(ratio=ratio).validate()
    with pytest.raises(UserError, match="attack.ratio"):
        make_plan(LABELS, C, {**settings(), "ratio": ratio})


def test_save_load_round_trip_and_verification(tmp_path):
    p = plan_for(name="wanet", ratio=0.1)
    p.save(tmp_path, [str(c) for c in range(C)])
    assert (tmp_path / PLAN_FILE).is_file() and (tmp_path / SUMMARY_FILE).is_file()
    q = PoisonPlan.load(tmp_path / PLAN_FILE)
    for name in ("poisoned", "labels", "true_labels", "noise"):
        assert np.array_equal(getattr(p, name), getattr(q, name))
    assert q.target == p.target and q.settings == p.settings
    verify_plan(q, p.settings, "h" * 64, len(LABELS), tmp_path / PLAN_FILE)
    with pytest.raises(UserError, match="another dataset"):
        verify_plan(q, p.settings, "x" * 64, len(LABELS), tmp_path / PLAN_FILE)
    with pytest.raises(UserError, match="ratio"):
        verify_plan(q, {**p.settings, "ratio": 0.2}, "h" * 64, len(LABELS), tmp_path / PLAN_FILE)
    with pytest.raises(UserError, match="trigger"):
        verify_plan(q, settings(name="wanet", ratio=0.1, **{"wanet.s": 1.0}), "h" * 64, len(LABELS),
                    tmp_path / PLAN_FILE)


def test_corrupt_plan_file_is_a_user_error(tmp_path):
    (tmp_path / PLAN_FILE).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable poison plan"):
        PoisonPlan.load(tmp_path / PLAN_FILE)

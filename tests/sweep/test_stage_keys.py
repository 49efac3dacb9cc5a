"""The stage-store key: it changes with exactly the config keys a stage depends on.

Every leaf of the config is perturbed in turn; the expected dependency sets below are
written out by hand from what each stage reads (its own section, the data settings the
views read, the chosen attack, the model, seed, precision, the arithmetic-changing
distributed settings, and its upstream stages), not taken from ``depends_on``.
"""
from __future__ import annotations

import copy

import pytest

from engine.config import load_config, to_dict
from engine.stages import STAGES
from engine.stages.keys import dependencies, stage_key

ATTACK = {f"attack.{k}" for k in ("name", "target", "ratio", "label_mode", "select_from", "clean_label_ratio_of",
                                  "seed", "badnets")}
COMMON = {"data.image_size", "data.decode_size", "data.mean", "data.std", "data.horizontal_flip", "model", "seed",
          "precision", "distributed.batch_semantics", "distributed.lr_scaling", "distributed.grad_clip"} | ATTACK
EXPECTED = {
    "supervised": COMMON | {"supervised"},
    "pretrain": COMMON | {"pretrain"},
    "linear": COMMON | {"pretrain", "linear"},
    "finetune": COMMON | {"pretrain", "linear", "finetune"},
    "finetune_labelled": COMMON | {"pretrain", "linear", "finetune_labelled"},
}


def leaves(node, prefix=""):
    for k, v in node.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, path + ".")
        else:
            yield path


def perturbed(cfg: dict, path: str) -> dict:
    out = copy.deepcopy(cfg)
    *head, last = path.split(".")
    node = out
    for h in head:
        node = node[h]
    v = node[last]
    if isinstance(v, bool):
        node[last] = not v
    elif isinstance(v, (int, float)):
        node[last] = v + 1
    elif isinstance(v, str):
        node[last] = v + "_changed"
    elif isinstance(v, list):
        node[last] = ([v[0] + 0.5] + v[1:] if v and isinstance(v[0], (int, float)) else v + ["changed"])
    else:
        node[last] = "changed"
    return out


def in_set(path: str, deps: set[str]) -> bool:
    return any(path == d or path.startswith(d + ".") for d in deps)


def test_every_stage_is_covered():
    assert set(EXPECTED) == set(STAGES)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_key_changes_exactly_with_the_dependency_set(stage):
    cfg = to_dict(load_config(None))
    assert cfg["attack"]["name"] == "badnets"
    key = stage_key(cfg, stage, dataset_hash="h0")
    wrong = []
    for path in leaves(cfg):
        changed = stage_key(perturbed(cfg, path), stage, dataset_hash="h0") != key
        if changed != in_set(path, EXPECTED[stage]):
            wrong.append(f"{path}: key {'changed' if changed else 'unchanged'}")
    assert not wrong, wrong
    assert stage_key(cfg, stage, dataset_hash="h1") != key  # other data under the same path
    assert "data.root" not in dependencies(cfg, stage, dataset_hash="h0")


def test_clean_runs_ignore_the_attack_settings():
    cfg = to_dict(load_config(None, ["attack.name=none"]))
    key = stage_key(cfg, "pretrain", dataset_hash="h")
    for path in ("attack.target", "attack.ratio", "attack.badnets.pattern", "attack.implant_threshold"):
        assert stage_key(perturbed(cfg, path), "pretrain", dataset_hash="h") == key, path


def test_world_size_counts_only_with_per_rank_batches():
    cfg = to_dict(load_config(None))
    assert stage_key(cfg, "linear", dataset_hash="h", world_size=1) == stage_key(cfg, "linear", dataset_hash="h",
                                                                                   world_size=8)
    per_rank = to_dict(load_config(None, ["distributed.batch_semantics=per_rank"]))
    assert stage_key(per_rank, "linear", dataset_hash="h", world_size=1) != stage_key(per_rank, "linear",
                                                                                        dataset_hash="h", world_size=8)

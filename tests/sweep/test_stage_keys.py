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
# The numerics every stage's key holds: where it trains and the backend (on CPU, TF32 and
# cuDNN's algorithm search change nothing; the DeepSpeed JSON counts only under DeepSpeed).
NUMERICS = {"device", "distributed.engine"}
COMMON = {"data.image_size", "data.decode_size", "data.decode_device", "data.mean", "data.std", "data.horizontal_flip",
          "model", "seed", "precision", "distributed.batch_semantics", "distributed.lr_scaling",
          "distributed.grad_clip"} | ATTACK | NUMERICS
EXPECTED = {
    "supervised": COMMON | {"supervised"},
    "pretrain": COMMON | {"pretrain"},
    "linear": COMMON | {"pretrain", "linear"},
    "finetune": COMMON | {"pretrain", "linear", "finetune"},
    "finetune_labelled": COMMON | {"pretrain", "linear", "finetune_labelled"},
    "abl": COMMON | {"abl"},
    "asd": COMMON | {"asd"},
}


def cfg_with(*overrides: str) -> dict:
    return to_dict(load_config(None, list(overrides)))


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


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("stage", ["supervised", "pretrain", "finetune"])
def test_tf32_and_cudnn_search_count_on_cuda_only(stage):
    cuda = {flag: stage_key(cfg_with(f"distributed.tf32={flag}"), stage, dataset_hash="h", device_type="cuda")
            for flag in ("true", "false")}
    assert cuda["true"] != cuda["false"]
    cpu = {flag: stage_key(cfg_with(f"distributed.tf32={flag}"), stage, dataset_hash="h", device_type="cpu")
           for flag in ("true", "false")}
    assert cpu["true"] == cpu["false"]
    assert dependencies(cfg_with(), stage, dataset_hash="h", device_type="cpu")["distributed.tf32"] == "cpu: no effect"
    bench = [stage_key(cfg_with(f"distributed.cudnn_benchmark={b}"), stage, dataset_hash="h", device_type="cuda")
             for b in ("true", "false")]
    assert bench[0] != bench[1]
    # A stage trained on CPU is not reused on CUDA, nor the other way round.
    assert stage_key(cfg_with(), stage, dataset_hash="h", device_type="cpu") != cuda["true"]


def _ds(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_deepspeed_config_keyed_by_resolved_content(tmp_path):
    ds = lambda path: cfg_with("distributed.engine=deepspeed", f"distributed.deepspeed_config={path}")  # noqa: E731
    base = _ds(tmp_path, "a.json", '{"zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": true}')
    # The same settings elsewhere, spelt differently (order, spacing, a default written out).
    same = _ds(tmp_path, "b.json", '{"zero_allow_untested_optimizer": true,\n "gradient_clipping": 0.0, '
                                    '"zero_optimization": {"stage": 0}}')
    zero1 = _ds(tmp_path, "c.json", '{"zero_optimization": {"stage": 1}}')
    key = {p: stage_key(ds(p), "pretrain", dataset_hash="h") for p in (base, same, zero1)}
    assert key[base] == key[same]
    assert key[base] != key[zero1]
    assert key[base] != stage_key(cfg_with(), "pretrain", dataset_hash="h")  # DeepSpeed vs DDP
    # Gradient clipping: the JSON and distributed.grad_clip must agree, and the key follows.
    clip = _ds(tmp_path, "d.json", '{"zero_optimization": {"stage": 0}, "gradient_clipping": 1.0}')
    clipped = cfg_with("distributed.engine=deepspeed", f"distributed.deepspeed_config={clip}",
                       "distributed.grad_clip=1.0")
    assert stage_key(clipped, "pretrain", dataset_hash="h") != key[base]
    # fp16 loss scaling lives only in the JSON.
    fp16 = '{"fp16": {"enabled": true, "initial_scale_power": %d}, "zero_optimization": {"stage": 0}}'
    keys16 = [stage_key(cfg_with("distributed.engine=deepspeed", "precision=fp16",
                                 f"distributed.deepspeed_config={_ds(tmp_path, f's{p}.json', fp16 % p)}"),
                        "pretrain", dataset_hash="h") for p in (16, 8)]
    assert keys16[0] != keys16[1]
    # The path alone is not in the key.
    assert base not in str(dependencies(ds(base), "pretrain", dataset_hash="h"))


# ---------------------------------------------------------------- files


def test_file_settings_keyed_by_content_not_path(tmp_path):
    from PIL import Image

    def png(name: str, colour) -> str:
        path = tmp_path / name
        Image.new("RGB", (8, 8), colour).save(path)
        return str(path)

    kitty, copy_elsewhere = png("kitty.png", (200, 10, 10)), None
    (tmp_path / "other").mkdir()
    copy_elsewhere = str(tmp_path / "other" / "pattern.png")
    (tmp_path / "other" / "pattern.png").write_bytes((tmp_path / "kitty.png").read_bytes())
    blended = lambda path: cfg_with("attack.name=blended", f"attack.blended.pattern={path}")  # noqa: E731
    before = stage_key(blended(kitty), "pretrain", dataset_hash="h")
    assert stage_key(blended(copy_elsewhere), "pretrain", dataset_hash="h") == before  # same bytes, other path
    png("kitty.png", (10, 200, 10))  # the pattern replaced at the same path
    assert stage_key(blended(kitty), "pretrain", dataset_hash="h") != before
    assert kitty not in str(dependencies(blended(kitty), "pretrain", dataset_hash="h"))
    # BadNets: a pattern file is hashed; a preset name stays a name.
    badnets = lambda p: cfg_with(f"attack.badnets.pattern={p}")  # noqa: E731
    assert stage_key(badnets(kitty), "pretrain", dataset_hash="h") != stage_key(badnets(copy_elsewhere), "pretrain",
                                                                                dataset_hash="h")
    assert dependencies(badnets("dbd2x2"), "pretrain", dataset_hash="h")["attack"]["badnets"]["pattern"] == "dbd2x2"


def test_label_consistent_cache_keyed_by_content(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lc = lambda *o: cfg_with("attack.name=label_consistent", f"run_dir={run_dir}", *o)  # noqa: E731
    (run_dir / "lc_perturbations.npy").write_bytes(b"v1")
    (run_dir / "lc_perturbations.json").write_text("{}")
    first = stage_key(lc(), "supervised", dataset_hash="h")
    (run_dir / "lc_perturbations.npy").write_bytes(b"v2")  # attack-prepare rerun with other settings
    assert stage_key(lc(), "supervised", dataset_hash="h") != first
    # The same cache named by path from elsewhere is the same input.
    named = tmp_path / "cache.npy"
    named.write_bytes(b"v2")
    (tmp_path / "cache.json").write_text("{}")
    assert stage_key(lc(f"attack.label_consistent.perturbations={named}"), "supervised", dataset_hash="h") == \
        stage_key(lc(), "supervised", dataset_hash="h")


def test_speed_only_keys_share_stages():
    base = cfg_with()
    for override in ("data.num_workers=1", "data.root=/elsewhere", "runtime.threads=1", "logging.log_every=3",
                     "distributed.checkpoint_every=7", "distributed.process_group=gloo",
                     "data.trigger_device=device"):
        for stage in EXPECTED:
            assert stage_key(cfg_with(override), stage, dataset_hash="h") == stage_key(base, stage, dataset_hash="h"), \
                (override, stage)

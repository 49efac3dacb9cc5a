from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import Config, dump_yaml, load_config
from engine.errors import UserError


def test_defaults_are_the_dbd_reference():
    cfg = Config()
    assert (cfg.pretrain.batch_size, cfg.pretrain.lr, cfg.pretrain.temperature) == (512, 0.4, 0.5)
    assert (cfg.pretrain.epochs, cfg.pretrain.schedule_epochs) == (100, 1000)
    assert cfg.pretrain.views.scale == (0.2, 1.0) and cfg.pretrain.views.jitter_p == 0.8
    assert (cfg.linear.epochs, cfg.linear.batch_size, cfg.linear.lr) == (10, 128, 0.002)
    assert (cfg.linear.sce_alpha, cfg.linear.sce_beta) == (0.1, 1.0)
    f = cfg.finetune
    assert (f.epochs, f.iterations_per_epoch, f.batch_size, f.epsilon, f.lambda_u,
            f.rampup_epochs) == (190, 1024, 64, 0.5, 15.0, 190)
    assert (f.temperature, f.mixup_alpha, f.k_views, f.ema_decay) == (0.5, 0.75, 2, 0.0)
    s = cfg.supervised
    assert (s.epochs, s.lr, s.weight_decay, s.milestones) == (200, 0.1, 5e-4, (100, 150))
    assert cfg.attack.target == 3 and cfg.attack.select_from == "non_target"


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"name": "digits", "root": "/x"}, "pretrain": {"epochs": 3}}))
    cfg = load_config(p, ["pretrain.epochs=5", "attack.blended.alpha=0.2", "stages=[pretrain,linear]",
                          "pretrain.views.scale=[0.3, 0.9]", "data.horizontal_flip=false"])
    assert cfg.data.name == "digits" and cfg.pretrain.epochs == 5 and cfg.attack.blended.alpha == 0.2
    assert cfg.stages == ("pretrain", "linear") and cfg.pretrain.views.scale == (0.3, 0.9)
    assert cfg.data.horizontal_flip is False
    # The resolved config round-trips.
    again = tmp_path / "r.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize("override, message", [
    ("pretrain.epoch=3", "unknown key 'pretrain.epoch'; did you mean 'pretrain.epochs'"),
    ("atack.ratio=0.1", "unknown key 'atack'; did you mean 'attack'"),
    ("pretrain.epochs=many", "pretrain.epochs must be an integer"),
    ("attack.ratio=0", "attack.ratio must be in (0, 1]"),
    ("attack.ratio=1.5", "attack.ratio must be in (0, 1]"),
    ("attack.blended.alpha=2", "attack.blended.alpha must be in [0, 1]"),
    ("distributed.engine=horovod", "distributed.engine 'horovod' is unknown: must be one of ddp, deepspeed"),
    ("finetune.epsilon=1", "finetune.epsilon must be in (0, 1)"),
    ("pretrain.views.scale=[0.5]", "must have 2 items"),
    ("stages=[pretrain,evaluate]", "unknown stage 'evaluate'"),
    ("data.horizontal_flip=maybe", "must be true or false"),
    ("noequals", "must look like dotted.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping at the top level"):
        load_config(bad)


def is_grid(path: Path) -> bool:
    """A sweep's grid file (engine.sweep.grid), not a run config."""
    return "grid" in (yaml.safe_load(path.read_text()) or {})


def test_every_preset_loads():
    from engine.sweep.grid import load_grid

    presets = sorted(Path("configs").rglob("*.yaml"))
    assert presets, "configs/ holds no preset"
    for p in presets:
        if is_grid(p):
            assert load_grid(p).cells
        else:
            load_config(p)


def test_cli_unknown_key_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine", "run", "configs/demo/digits_badnets_dbd.yaml",
                        "pretrain.epoch=3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: config: unknown key 'pretrain.epoch'; did you mean 'pretrain.epochs'?"


def test_every_preset_loads_and_trains_in_fp32():
    """Presets are the reference experiment: fp32, whatever the speed overrides."""
    repo = Path(__file__).resolve().parents[1]
    presets = [p for p in sorted((repo / "configs").rglob("*.yaml")) if not is_grid(p)]
    assert len(presets) >= 15
    for path in presets:
        cfg = load_config(path)
        assert cfg.precision == "fp32", path


def test_renamed_key_still_loads_with_one_warning(tmp_path):
    """distributed.backend is distributed.engine's old name: old configs and run dirs load."""
    old = tmp_path / "old.yaml"
    old.write_text("distributed:\n  backend: deepspeed\n")
    with pytest.warns(FutureWarning, match="distributed.backend is deprecated, use distributed.engine") as caught:
        cfg = load_config(old)
    assert cfg.distributed.engine == "deepspeed" and len(caught) == 1
    with pytest.raises(UserError, match="old name of distributed.engine"):
        load_config(old, ["distributed.engine=ddp"])


def test_a_grid_cannot_vary_the_engine_under_its_old_name(tmp_path):
    from engine.sweep.grid import load_grid

    grid = tmp_path / "grid.yaml"
    grid.write_text("base: configs/demo/digits_badnets_dbd.yaml\ngrid:\n  distributed.backend: [ddp, deepspeed]\n")
    with pytest.raises(UserError, match="cannot vary within one sweep"):
        load_grid(grid)

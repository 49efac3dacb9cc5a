"""A stage's model file outside the run that trained it.

``dbd evaluate``: a finished stage's model.pt, scored by the command, gives the very
BA/ASR/RA the stage recorded at its end (the same test sets, trigger and evaluator); the
same weights saved as a wrapped plain state dict load the same; a config whose model
does not describe the checkpoint is one clear error naming the parameter.

``dbd export``: the files load in a fresh process that never imports the engine, and
give the engine model's outputs (TorchScript) or its exact tensors (safetensors)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.test_pipeline import dbd

pytestmark = pytest.mark.slow

TINY = {
    "stages": ["supervised"], "seed": 0, "device": "cpu",
    "data": {"name": "digits", "num_workers": 1, "horizontal_flip": False},
    "attack": {"name": "badnets", "target": 0, "ratio": 0.1, "select_from": "all"},
    "model": {"arch": "cifar_resnet18", "width": 4},
    "supervised": {"epochs": 1, "iterations_per_epoch": 4, "batch_size": 32},
    "logging": {"progress": False, "log_every": 1, "feature_map": False},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root):
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "root": str(digits_root)},
                                   "run_dir": str(tmp / "run")}))
    r = dbd("run", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, cfg, json.loads((tmp / "run" / "supervised" / "done.json").read_text())


def test_model_pt_scores_what_the_stage_recorded(trained):
    tmp, cfg, done = trained
    out = tmp / "eval.json"
    r = dbd("evaluate", tmp / "run" / "supervised" / "model.pt", cfg, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    for k in ("BA", "ASR", "RA"):
        assert got[k] == pytest.approx(done[k], abs=1e-9), k
    assert got["attack"]["name"] == "badnets" and got["model"]["width"] == 4


def test_a_wrapped_state_dict_from_elsewhere_loads_the_same_weights(trained, tmp_path):
    # In this process (the command's scoring is the test above): fit_checkpoint is what
    # `dbd evaluate` loads any file through.
    from engine.models import Classifier
    from engine.stages.weights import fit_checkpoint

    tmp, _, _ = trained
    state = torch.load(tmp / "run" / "supervised" / "model.pt", map_location="cpu", weights_only=True)
    wrapped = tmp_path / "elsewhere.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    model = Classifier("cifar_resnet18", 4, 10)
    fit_checkpoint(model, wrapped, "the test's model")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_model_section_that_does_not_fit_is_one_clear_error(trained):
    tmp, cfg, _ = trained
    r = dbd("evaluate", tmp / "run" / "supervised" / "model.pt", cfg, "model.width=8")
    assert r.returncode == 2
    assert "does not fit model.arch=cifar_resnet18 model.width=8" in r.stderr and "parameter" in r.stderr
    assert "Traceback" not in r.stderr
    r = dbd("evaluate", tmp / "nothing.pt", cfg)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr


# Run in a fresh interpreter with the engine out of reach: what a user of the files has.
LOAD = """
import json, sys
sys.modules["engine"] = None  # importing the engine now fails
import torch
out, fmt = sys.argv[1], sys.argv[2]
info = json.load(open(out + "/model.json"))
if fmt == "torchscript":
    model = torch.jit.load(out + "/" + info["file"])
    x = torch.load(out + "/x.pt")
    torch.save(model(x), out + "/y.pt")
else:
    from safetensors.torch import load_file
    torch.save(load_file(out + "/" + info["file"]), out + "/state.pt")
print(json.dumps(info))
"""


def _engine_model(tmp, cfg):
    from engine.config import load_config
    from engine.models import Classifier
    from engine.stages.weights import fit_checkpoint

    c = load_config(cfg)
    model = Classifier(c.model.arch, c.model.width, 10)
    fit_checkpoint(model, tmp / "run" / "supervised" / "model.pt", "the test's model")
    return model.eval(), c


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_export_loads_without_the_engine(trained, fmt):
    tmp, cfg, done = trained
    out = tmp / f"export-{fmt}"
    r = dbd("export", tmp / "run", "--stage", "supervised", "--format", fmt, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    model, c = _engine_model(tmp, cfg)
    torch.manual_seed(0)
    x = torch.rand(4, 3, c.data.image_size, c.data.image_size)
    torch.save(x, out / "x.pt")
    p = subprocess.run([sys.executable, "-c", LOAD, str(out), fmt], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["arch"] == "cifar_resnet18" and info["width"] == 4 and info["classes"] == [str(i) for i in range(10)]
    assert info["source"]["BA"] == done["BA"]
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(info["std"]).view(1, 3, 1, 1)
    if fmt == "torchscript":
        with torch.no_grad():
            want = model((x - mean) / std)
        torch.testing.assert_close(torch.load(out / "y.pt"), want, rtol=1e-5, atol=1e-5)
    else:
        state = torch.load(out / "state.pt")
        own = model.state_dict()
        assert set(state) == set(own)
        for k, v in own.items():
            assert torch.equal(state[k], v.float()), k


def test_export_of_an_unfinished_stage_is_one_clear_error(trained):
    tmp, _, _ = trained
    r = dbd("export", tmp / "run", "--stage", "finetune")
    assert r.returncode == 2 and "holds no finished model" in r.stderr and "supervised" in r.stderr

"""Host syncs inside one training step of every stage, counted on a CPU.

A ``.item()``, ``.cpu()``, ``.tolist()``, boolean-mask index or blocking ``.to()`` in a
step costs nothing here but stalls a GPU's launch queue once per step (issue 13). The
counter (``engine/runtime/host_sync.py``) records each one the project's code makes,
wherever it runs, so a new one fails this test on a CPU. The view kernels are counted
apart: on CUDA they run as Triton, and the PyTorch twin's CPU path groups samples with
``.nonzero()`` on purpose (it is cache-friendly there).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.fsutil import write_json
from engine.runtime.checkpoint import save_final_model
from engine.runtime.host_sync import HostSyncCounter

from engine.stages import STAGES as REGISTERED
from tests.stages.test_stage_steps import TINY, _first_batch, _linear_upstream, _stage

# Each stage's own tiny settings, plus what this test needs besides: no synchronised
# BatchNorm (one process), and the fine-tuning paths that a host sync could hide in.
EXTRA = {"pretrain": ["pretrain.sync_bn=false"],
         "finetune": ["finetune.adam_from_linear=false", "finetune.ema_decay=0.99"]}
STAGES = {name: [*cls.tiny_overrides(), *EXTRA.get(name, [])] for name, cls in REGISTERED.items()}


def _upstream(name: str, run_dir: Path, root: Path) -> None:
    from engine.models import SimCLRModel

    cfg = load_config(None, TINY + [f"data.root={root}"])
    if name == "linear":
        (run_dir / "pretrain").mkdir(parents=True)
        save_final_model(run_dir / "pretrain" / "model.pt", SimCLRModel(cfg.model.arch, cfg.model.width))
        write_json(run_dir / "pretrain" / "done.json", {"stage": "pretrain"})
    elif name.startswith("finetune"):
        _linear_upstream(run_dir, cfg, epochs=1)


def _without_views(stage, monkeypatch):
    """Count the views apart: wrap the stage's view callables in a pause of the counter."""
    from torch.overrides import _pop_mode_temporarily

    def paused(fn):
        def call(*args, **kwargs):
            with _pop_mode_temporarily():
                return fn(*args, **kwargs)
        return call

    for attr in ("augment", "views"):
        if hasattr(stage, attr):
            monkeypatch.setattr(stage, attr, paused(getattr(stage, attr)))


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_training_step_makes_no_host_sync(digits_root, tmp_path, monkeypatch, name):
    run_dir = tmp_path / "run"
    _upstream(name, run_dir, digits_root)
    _, stage = _stage(digits_root, run_dir, name, *STAGES[name])
    stage.on_epoch_start(0)
    batch = _first_batch(stage, 0)
    _without_views(stage, monkeypatch)
    with HostSyncCounter() as prepare:
        inputs = stage.prepare(batch, 0, 0)
    with HostSyncCounter() as update:
        stage.update(inputs, 0, 1)
    assert prepare.summary() == {} and update.summary() == {}, \
        f"host syncs in {name}'s step: prepare {prepare.summary()}, update {update.summary()}"


def test_the_counter_sees_each_kind_of_sync():
    """The counter itself, on calls made from project code (engine.runtime.host_sync's
    own helpers are excluded, so the calls run through a project module)."""
    from engine.losses import sce  # any project module: the calls are attributed to it

    x = torch.arange(6.0)
    code = compile("x[0].item(); x.tolist(); x.cpu(); x.to('cpu'); x[x > 2]; x.nonzero(); bool(x[1] > 0)\n"
                   "x.to('cpu', non_blocking=True); x.to(torch.float64); x * 2",
                   sce.__file__, "exec")
    with HostSyncCounter() as c:
        exec(code, {"x": x, "torch": torch})
    assert [s.what for s in c.calls] == ["item", "tolist", "cpu", "to (blocking)", "boolean-mask index", "nonzero",
                                         "__bool__"]
    assert all(s.where.startswith("sce.py:") for s in c.calls)
    # Calls from outside the project (here: this test file) are not counted.
    with HostSyncCounter() as outside:
        x[0].item()
    assert len(outside) == 0

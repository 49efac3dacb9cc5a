"""Which grids share stages and which train their own, as a sweep decides it: each cell's
stage-store entries (``engine.sweep.slurm.stage_entries``, the names ``dbd run`` trains
into), computed from real grid files over a real prepared dataset, nothing trained.

Shared: values that change only speed or where things are (``data.num_workers``, the
same data under another ``data.root``, the launcher's world size under global batches).
Separate: everything that changes a result, also where only a file's bytes or a JSON's
content differ (a pattern image replaced, two DeepSpeed configs), and TF32 on CUDA."""
from __future__ import annotations

import shutil

import yaml
from PIL import Image

from engine.sweep.grid import load_grid
from engine.sweep.slurm import stage_entries

STAGES = ["supervised", "pretrain", "linear", "finetune"]


def entries(tmp_path, root, grid: dict, name: str, overrides: dict | None = None, slurm: dict | None = None):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"device": "auto", "data": {"name": "digits"}, "stages": STAGES}))
    path = tmp_path / f"{name}.yaml"
    doc = {"base": str(base), "overrides": {"data.root": str(root), **(overrides or {})}, "grid": grid}
    if slurm:
        doc["slurm"] = slurm
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return stage_entries(load_grid(path), tmp_path / f"out-{name}")


def test_speed_only_values_share_every_stage(tmp_path, digits_root):
    copy = tmp_path / "digits-copy"
    shutil.copytree(digits_root, copy)
    for name, grid in (("workers", {"data.num_workers": [1, 2]}),
                       ("root", {"data.root": [str(digits_root), str(copy)]}),
                       ("threads", {"runtime.threads": [1, 2]}),
                       ("cadence", {"distributed.checkpoint_every": [0, 50]})):
        a, b = entries(tmp_path, digits_root, grid, name)
        assert a == b, (name, a, b)
    # The launcher: the same cell as a 1-task and an 8-task Slurm job (global batches).
    one = entries(tmp_path, digits_root, {"seed": [0]}, "one", slurm={"nodes": 1, "tasks_per_node": 1})
    eight = entries(tmp_path, digits_root, {"seed": [0]}, "eight", slurm={"nodes": 2, "tasks_per_node": 4})
    assert one == eight


def test_result_changing_values_train_their_own(tmp_path, digits_root):
    def png(name, colour):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
        return str(tmp_path / name)

    kitty, same_bytes, other = png("kitty.png", (200, 0, 0)), png("copy.png", (200, 0, 0)), png("b.png", (0, 0, 200))
    a, b, c = entries(tmp_path, digits_root, {"attack.blended.pattern": [kitty, same_bytes, other]}, "pattern",
                      overrides={"attack.name": "blended"})
    assert a == b and set(a).isdisjoint(c)
    # The same path, the image replaced: a new entry for every stage.
    png("kitty.png", (0, 200, 0))
    (again,) = entries(tmp_path, digits_root, {"attack.blended.pattern": [kitty]}, "replaced",
                       overrides={"attack.name": "blended"})
    assert set(again).isdisjoint(a)

    (tmp_path / "z0.json").write_text('{"zero_optimization": {"stage": 0}}')
    (tmp_path / "z1.json").write_text('{"zero_optimization": {"stage": 1}}')
    z0, z1 = entries(tmp_path, digits_root,
                     {"distributed.deepspeed_config": [str(tmp_path / "z0.json"), str(tmp_path / "z1.json")]},
                     "deepspeed", overrides={"distributed.engine": "deepspeed"})
    assert set(z0).isdisjoint(z1)

    # TF32 on GPU tasks (auto device, one GPU per task) splits; on CPU tasks it cannot.
    gpu = entries(tmp_path, digits_root, {"distributed.tf32": [True, False]}, "tf32gpu",
                  slurm={"gpus_per_task": 1})
    cpu = entries(tmp_path, digits_root, {"distributed.tf32": [True, False]}, "tf32cpu", slurm={"gpus_per_task": 0})
    assert set(gpu[0]).isdisjoint(gpu[1]) and cpu[0] == cpu[1]

    # finetune.epsilon: only the fine-tuning stage is its own; the rest is shared.
    e5, e3 = entries(tmp_path, digits_root, {"finetune.epsilon": [0.5, 0.3]}, "epsilon")
    assert e5[:3] == e3[:3] and e5[3] != e3[3]

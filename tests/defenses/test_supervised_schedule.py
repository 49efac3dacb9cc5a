"""The baseline's learning-rate schedules against torch's own schedulers."""
from __future__ import annotations

import pytest
import torch

from tests.stages.test_stage_steps import _stage


@pytest.mark.parametrize("schedule,extra", [("cosine", []), ("step", ["supervised.milestones=[2,5]"])])
def test_the_schedule_is_torchs(digits_root, tmp_path, schedule, extra):
    _, stage = _stage(digits_root, tmp_path / "run", "supervised", f"supervised.schedule={schedule}",
                      "supervised.epochs=7", "supervised.lr=0.01", *extra)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7) if schedule == "cosine"
             else torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 5], gamma=0.1))
    for epoch in range(7):
        stage.on_epoch_start(epoch)
        assert stage.backend.get_lr() == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()

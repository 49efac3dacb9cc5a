"""Progress off a terminal: one plain line every ``interval_s`` seconds (a fake clock),
never a carriage return; on a terminal, tqdm's bar."""
from __future__ import annotations

import io

from engine.report.progress import Progress


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_log_file_gets_one_plain_line_per_interval():
    out, clock = io.StringIO(), Clock()
    p = Progress(total=100, desc="linear", interval_s=10, stream=out, clock=clock)
    for step in range(25):  # one step a second, 32 images each
        clock.t += 1.0
        p.update(32, loss=0.5 - step / 100)
    p.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines == ["[linear] step 10/100 (10%), 32 img/s, loss 0.41",
                     "[linear] step 20/100 (20%), 32 img/s, loss 0.31"]


def test_a_resumed_stage_counts_from_its_first_step():
    out, clock = io.StringIO(), Clock()
    p = Progress(total=10, desc="finetune", initial=6, interval_s=1, stream=out, clock=clock)
    clock.t += 2.0
    p.update(8)
    assert out.getvalue() == "[finetune] step 7/10 (70%), 4 img/s\n"


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    p = Progress(total=10, desc="x", enabled=False, interval_s=0.001, stream=out)
    for _ in range(5):
        p.update(1)
    assert out.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar():
    out = Terminal()
    p = Progress(total=3, desc="pretrain", stream=out)
    p.update(4)
    p.close()
    assert "pretrain" in out.getvalue() and "\r" in out.getvalue()

"""More decoding threads than cores: clamped with one warning line, not FFCV's ValueError."""
from __future__ import annotations

import os

from engine.data.loaders import LoaderSpec, make_loader


def test_num_workers_above_the_core_count_is_clamped_with_one_warning(digits_root, capsys):
    cores = len(os.sched_getaffinity(0))
    spec = LoaderSpec(root=str(digits_root), split="test", batch_size=100, shuffle=False, drop_last=False,
                      num_workers=cores + 6)
    for _ in range(2):  # a second loader with the same request does not warn again
        loader = make_loader(spec)
        n = sum(len(labels) for _, labels, _ in loader)
        assert n == 450
    out = capsys.readouterr().out
    assert out.count("warning: data.num_workers") == 1
    assert f"data.num_workers={cores + 6} but only {cores} cores are available: using {cores}" in out

"""The cost meter against independent clocks: CPU time from time.process_time, a memory
peak that is freed before the stage ends, and a resumed stage's carried time."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from engine.runtime.cost import CostMeter
from engine.runtime.launch import DistInfo

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), pg_backend=None, launcher="single")


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_cpu_time_memory_peak_and_carry():
    cpu0, wall0 = time.process_time(), time.perf_counter()
    meter = CostMeter(SINGLE).start()
    busy(0.4)
    block = np.ones(300 * 2**20, dtype=np.uint8)  # 300 MiB, touched
    block[::4096] = 2
    time.sleep(0.5)  # the sampler sees it
    del block
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    record = meter.finish(images=1200, carried={"wall_seconds": 10.0, "cpu_seconds": 36.0})
    # process_time counts every thread of the process, as getrusage does.
    assert abs(record["cpu_core_hours"] * 3600 - (36.0 + cpu)) < 0.1
    assert record["device_hours"] == record["cpu_core_hours"] and record["device_hours_unit"] == "CPU core-hours"
    assert abs(record["wall_seconds"] - (10.0 + wall)) < 0.1 and record["resumed_attempts_seconds"] == 10.0
    # From the unrounded wall time: within the rounding of both figures.
    assert record["images_per_second"] == pytest.approx(1200 / record["wall_seconds"], abs=0.11)
    assert record["peak_host_rss_mib"] > 300  # freed before finish: only a sampled peak sees it
    assert record["peak_gpu_memory_mib"] is None and record["world_size"] == 1
    assert record["versions"]["torch"] == torch.__version__ and record["commit"]

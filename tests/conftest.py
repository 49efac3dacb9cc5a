"""Session fixtures shared by every test folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core plus one), give each
    worker its own cores, or with more workers than cores one core each, in turn.

    The engine sets torch's threads to the cores a process may run on (``runtime.threads``
    0, see engine/runtime/threads.py), so two workers that both saw every core would each
    run 2-thread processes on 2 cores, and OpenMP slows oversubscribed processes by up to
    16x. Pinning each worker (and every subprocess it starts: affinity is inherited) to
    its own share makes the engine's own rule pick the right count. Results do not depend
    on it: every test that compares runs compares runs made under the same pinning.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...; unset without xdist
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    index = int(worker.removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = sorted(os.sched_getaffinity(0))
    # More workers than cores (make test runs one more worker than there are cores, so
    # that one worker's waits on timeouts and launchers are filled): one core each, in
    # turn, so every process still runs one thread per core it may use.
    share = {cores[index % len(cores)]} if workers > len(cores) else set(cores[index::workers])
    for task in os.listdir("/proc/self/task"):  # every thread already started, not just this one
        os.sched_setaffinity(int(task), share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))


# Test files that take minutes, longest first (fresh-clone `make test`, 2026-12-07). Under
# xdist's --dist loadfile a file runs on one worker; started last, the longest one ran on
# alone for about 5 minutes while the other worker idled. Started first, they overlap
# with everything else.
LONG_FILES = (
    "sweep/test_sweep_kill.py", "stages/test_compiled_steps.py", "benchmarks/test_bench_quick.py",
    "runtime/test_launchers.py", "benchmarks/test_gpu_smoke.py", "stages/test_deepspeed_stages.py",
    "sweep/test_sweep_run.py", "test_pipeline.py", "runtime/test_threads.py", "sweep/test_slurm_cluster.py",
    "kernels/test_kernels_triton.py", "benchmarks/test_bench_scale.py")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        try:
            rel = Path(item.path).resolve().relative_to(TESTS).as_posix()
        except ValueError:
            return len(LONG_FILES)
        return LONG_FILES.index(rel) if rel in LONG_FILES else len(LONG_FILES)

    items.sort(key=rank)  # stable: every other test keeps its order


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from engine.data.prepare import prepare

    out = tmp_path_factory.mktemp("digits")
    prepare("digits", None, out, progress=False)
    return out


@pytest.fixture(scope="session")
def color_root(tmp_path_factory) -> Path:
    """A tiny CIFAR-format dataset of stripe patterns (tests.builders.write_pattern_cifar),
    prepared: 200 training and 40 test images."""
    from engine.data.prepare import prepare
    from tests.builders import write_pattern_cifar

    base = tmp_path_factory.mktemp("pattern")
    folder = write_pattern_cifar(base / "src")
    out = base / "beton"
    prepare("cifar10", str(folder), out, progress=False)
    return out

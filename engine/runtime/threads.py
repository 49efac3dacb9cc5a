"""CPU threads: torch's intra-op count is the engine's choice, never FFCV's.

On a CPU the number of intra-op threads changes how reductions are split, hence float
rounding. FFCV's ``Compiler.set_num_threads`` (called when FFCV is imported, when a
``Loader`` is built and when an epoch starts) also calls ``torch.set_num_threads`` with
the loader's worker count, which made ``data.num_workers`` change results and made
every rank of a multi-process job run torch threads plus FFCV threads on the same cores.

Here, once per process:

* ``configure`` (called by ``engine.runtime.launch.init_distributed`` once the process
  group exists) neutralises FFCV, records the cores per local rank and sets torch's
  intra-op threads to
  ``runtime.threads`` (0: the cores this process may run on divided by the ranks on its
  node, at least 1). Inter-op threads are left alone: torch allows setting them only
  before any parallel work, once.
* ``neutralise_ffcv`` narrows FFCV's hook to numba's threads (the decoding threads), as a
  process-wide patch applied once; the engine's loaders call it before building a Loader.
* ``ffcv_workers`` caps a requested FFCV worker count at the cores per local rank.
"""
from __future__ import annotations

import os

import torch

_cores_per_rank: int | None = None  # set by configure; None: nothing configured yet
_torch_threads: int | None = None  # the engine's choice, once configured
_local_world_size: int | None = None
_ffcv_patched = False
_warned: set[tuple[int, int, int]] = set()
_workers_used: set[int] = set()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, narrowed by taskset, cgroups,
    srun/mpirun binding), or the machine's count where affinity is unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cores_per_rank(local_world_size: int | None, cores: int | None = None) -> int:
    """``cores`` (default: this process's) divided by the ranks on this node, at least 1.
    ``None`` ranks (a launcher that does not say) counts as one: the process's own
    affinity is then the only guide."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, local_world_size or 1))


def resolve(setting: int, local_world_size: int | None, cores: int | None = None) -> int:
    """The intra-op thread count for ``runtime.threads == setting`` (0: cores per rank)."""
    return setting if setting > 0 else cores_per_rank(local_world_size, cores)


def configure(runtime, local_world_size: int | None) -> int:
    """Set this process's torch intra-op threads from the ``runtime`` section (None: its
    defaults) and remember the cores per local rank for the loaders. Returns the count."""
    global _cores_per_rank, _torch_threads, _local_world_size
    setting = 0 if runtime is None else int(runtime.threads)
    _local_world_size = local_world_size
    _cores_per_rank = cores_per_rank(local_world_size)
    _torch_threads = resolve(setting, local_world_size)
    # Before torch's count: importing FFCV sets it to 1, so FFCV is imported (where it is
    # installed) and neutralised now, not when something imports it later.
    neutralise_ffcv()
    torch.set_num_threads(_torch_threads)
    return _torch_threads


def neutralise_ffcv() -> bool:
    """Make FFCV's ``Compiler.set_num_threads`` set numba's threads only (its decoding
    threads, FFCV's own rule for counts < 1 kept), once per process. Importing FFCV sets
    torch to 1 thread: the count in effect before the import (or the engine's) is put
    back. False where FFCV is not installed."""
    global _ffcv_patched
    if _ffcv_patched:
        return True
    before = torch.get_num_threads()
    try:
        from ffcv.pipeline.compiler import Compiler
    except (ImportError, OSError):  # not installed, or its native libraries are missing
        return False
    from numba import set_num_threads as numba_set_num_threads

    def numba_only(cls, n):
        n = n if n >= 1 else (os.cpu_count() or 1)
        cls.num_threads = n
        numba_set_num_threads(n)

    Compiler.set_num_threads = classmethod(numba_only)
    _ffcv_patched = True
    torch.set_num_threads(_torch_threads or before)
    return True


def ffcv_workers(requested: int, what: str = "data.num_workers") -> int:
    """``requested`` FFCV workers capped at the cores per local rank (FFCV refuses more
    threads than cores; more than a rank's share oversubscribes the node), one warning
    line per distinct cap. Before ``configure`` the process counts as alone on its cores."""
    cores = usable_cores()
    share = min(cores, _cores_per_rank if _cores_per_rank is not None else cores)
    n = min(requested, share)
    _workers_used.add(n)
    if n < requested and (requested, share, cores) not in _warned:
        _warned.add((requested, share, cores))
        if share == cores:
            print(f"warning: {what}={requested} but only {cores} cores are available: using {cores}", flush=True)
        else:
            print(f"warning: {what}={requested} but only {share} of the {cores} cores are this rank's share "
                  f"({_local_world_size} ranks on this node): using {share}", flush=True)
    return n


def ffcv_workers_used() -> int | None:
    """The largest FFCV worker count of the loaders this process built, None if none."""
    return max(_workers_used) if _workers_used else None

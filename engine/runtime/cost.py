"""What a stage cost: wall time, images, device-hours, peak memory, and where it ran.

``CostMeter`` brackets one stage attempt on every rank: wall seconds, the CPU time the
process used (all its threads, from ``getrusage``), the peak resident set size sampled
by a background thread (``ru_maxrss`` is a lifetime peak and cannot be reset between
stages), and on CUDA the peak allocated GPU memory. ``finish`` reduces them over ranks
(CPU time and GPU time summed, memory peaks maxed) and adds the facts that make a figure
comparable: world size, the CPU threads per rank (torch's intra-op count, which also
changes CPU rounding, and FFCV's decoding threads), device name, commit, and the torch /
FFCV / DeepSpeed versions.

Device-hours are GPU-hours on CUDA (world size x wall time) and CPU core-hours on CPU:
the CPU time the ranks consumed, summed, so an idle rank costs nothing and a rank that
keeps two cores busy costs two core-hours per hour.
"""
from __future__ import annotations

import functools
import os
import resource
import subprocess
import threading
import time
from importlib import metadata
from pathlib import Path

import torch

from engine.runtime.threads import ffcv_workers_used


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        # No /proc (macOS): the lifetime peak is the best there is (kilobytes on Linux).
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return float(r.ru_utime + r.ru_stime)


class _PeakSampler(threading.Thread):
    """The highest RSS seen, sampled every ``interval`` seconds until stopped."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True, name="dbd-rss-sampler")
        self.interval = interval
        self.peak = _rss_bytes()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def stop(self) -> int:
        self._stop_event.set()
        self.join(timeout=5)
        return max(self.peak, _rss_bytes())


@functools.lru_cache(maxsize=1)
def environment(device_type: str, device_index: int | None) -> dict:
    """Where a figure was measured: device name, commit, library versions."""
    return {"device": device_name(device_type, device_index), "commit": commit(),
            # torch's own string names its build (+cu130, +cpu); the others from their metadata.
            "versions": {"torch": torch.__version__, "ffcv": _version("ffcv"), "deepspeed": _version("deepspeed")}}


def device_name(device_type: str, device_index: int | None = None) -> str:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device_index)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    import platform

    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def commit() -> str:
    """The engine's git commit (``-dirty`` with uncommitted changes), or "unknown"."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _over_ranks(hi: torch.Tensor, neg_lo: torch.Tensor) -> int | str:
    hi, lo = int(hi), int(-neg_lo)
    return hi if hi == lo else f"{lo}-{hi}"


class CostMeter:
    """``meter = CostMeter(dist).start()`` ... ``meter.finish(images, carried)`` on every rank."""

    def __init__(self, dist):
        self.dist = dist
        self.cuda = dist.device.type == "cuda"

    def start(self) -> "CostMeter":
        self.t0 = time.perf_counter()
        self.cpu0 = _cpu_seconds()
        self.sampler = _PeakSampler()
        self.sampler.start()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dist.device)
        return self

    def close(self) -> None:
        """Stop the RSS sampler (idempotent; ``finish`` has read it by then)."""
        if self.sampler.is_alive():
            self.sampler.stop()

    def elapsed(self) -> tuple[float, float]:
        """(wall seconds, this process's CPU seconds) since start: what a checkpoint carries."""
        return time.perf_counter() - self.t0, _cpu_seconds() - self.cpu0

    def finish(self, images: int, carried: dict | None = None) -> dict:
        """The stage's cost record (a collective: every rank calls it). ``images`` is the
        number of training images of the whole stage; ``carried`` the wall and CPU
        seconds of earlier attempts up to their last checkpoint (a resumed stage)."""
        carried = carried or {}
        wall, cpu = self.elapsed()
        peak_rss = self.sampler.stop()
        peak_gpu = torch.cuda.max_memory_allocated(self.dist.device) if self.cuda else 0
        d = self.dist
        summed = d.all_reduce_sum(torch.tensor([cpu], dtype=torch.float64))
        # CPU threads this rank ran with at the end of the stage: torch's intra-op count
        # (the engine's runtime.threads) and the FFCV decoding threads of its loaders;
        # the max and (as -max of the negation) the min over ranks.
        threads = float(torch.get_num_threads())
        workers = float(ffcv_workers_used() or 0)
        peaks = torch.tensor([float(peak_rss), float(peak_gpu), wall, threads, -threads, workers, -workers],
                             dtype=torch.float64)
        if d.world_size > 1:
            # max as -sum(-x) would need a second collective type; all_reduce MAX is one.
            out = peaks.to(d.collective_device)
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
            peaks = out.cpu()
        wall_total = float(peaks[2]) + float(carried.get("wall_seconds", 0.0))
        cpu_total = float(summed[0]) + float(carried.get("cpu_seconds", 0.0))
        gpu_hours = d.world_size * wall_total / 3600 if self.cuda else 0.0
        record = {
            "wall_seconds": round(wall_total, 2),
            "images": int(images),
            "images_per_second": round(images / wall_total, 1) if wall_total > 0 else 0.0,
            "device_hours": round(gpu_hours if self.cuda else cpu_total / 3600, 6),
            "device_hours_unit": "GPU-hours" if self.cuda else "CPU core-hours",
            "cpu_core_hours": round(cpu_total / 3600, 6),
            "peak_host_rss_mib": round(float(peaks[0]) / 2**20, 1),  # the largest rank's
            "peak_gpu_memory_mib": round(float(peaks[1]) / 2**20, 1) if self.cuda else None,
            "world_size": d.world_size,
            "resumed_attempts_seconds": round(float(carried.get("wall_seconds", 0.0)), 2),
            # Per rank; a "lo-hi" string where ranks differ. torch's count changes CPU
            # rounding; FFCV's (None: no loader) changes only speed.
            "torch_threads": _over_ranks(peaks[3], peaks[4]),
            "ffcv_workers": _over_ranks(peaks[5], peaks[6]) or None,
        }
        index = d.device.index if self.cuda else None
        return {**record, **environment(d.device.type, index)}

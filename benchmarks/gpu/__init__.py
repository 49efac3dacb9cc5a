"""``python -m benchmarks gpu --out DIR``: the one prepared check of the GPU path, for one
GPU machine with Python, torch and Triton only (no FFCV, no network) and a 10-minute
limit. Its phases, schedule and ``--smoke`` CPU path: docs/benchmarks.md."""
from benchmarks.gpu.distributed_phase import CROSS_TOL
from benchmarks.gpu.plan import CAPS, GRACE_S, PHASES, SIZES, dist_stages
from benchmarks.gpu.progress import Progress
from benchmarks.gpu.runner import run

__all__ = ["CAPS", "CROSS_TOL", "GRACE_S", "PHASES", "SIZES", "Progress", "dist_stages", "run"]

"""``python -m benchmarks gpu --out DIR``: the one prepared check of the GPU path, for one
GPU machine with Python, torch and Triton only (no FFCV, no network) and a 10-minute
limit. Its phases, schedule and ``--smoke`` CPU path: docs/benchmarks.md."""
from benchmarks.gpu.plan import CAPS, GRACE_S, PHASES, SIZES, checked_stages
from benchmarks.gpu.progress import Progress
from benchmarks.gpu.runner import run

__all__ = ["CAPS", "GRACE_S", "PHASES", "SIZES", "Progress", "checked_stages", "run"]

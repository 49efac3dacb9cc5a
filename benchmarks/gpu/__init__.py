"""``python -m benchmarks gpu --out DIR``: the one prepared check of the GPU path.

Made for one GPU machine with Python, torch and Triton only (no FFCV, no network) and a
10-minute limit: it plans for at most 8 minutes (``CAPS`` + ``GRACE_S``), and nothing
it imports needs FFCV (the data is in memory: ``engine.data.memory``). Four phases, a
module each: ``kernels_phase`` (the fused Triton kernels against their PyTorch twin, by
the kernels tests' tolerances, kernels/tolerances.py), ``views_phase`` (views/s by
``benchmarks.augment``'s makers; GPU decode and the attacks' device twins),
``steps_phase`` (the real stages' steps, split by ``benchmarks.step.time_stage`` on CUDA
events) and ``distributed_phase`` (every stage at world size 1 over NCCL and 2 over gloo
on the one GPU, losses compared).

``runner`` runs each phase in a child process of its own (a CUDA fault or a hang cannot
take the others down; the distributed phase's ranks are such children already) under a
deadline it checks between cases (``common.Progress``, saved after every case, so even a
killed phase reports what it finished). ``render`` writes the markdown summary.

``--smoke`` (CI, no GPU) runs every phase's code on the CPU at tiny sizes: the kernels
and views phases under ``TRITON_INTERPRET=1``, the steps on the CPU, the 2-process run
over gloo on the CPU. What only CUDA can show is listed under each phase's ``cuda_only``
with the reason.
"""
from benchmarks.gpu.common import CAPS, GRACE_S, PHASES, SIZES, Progress, dist_stages
from benchmarks.gpu.distributed_phase import CROSS_TOL
from benchmarks.gpu.render import markdown
from benchmarks.gpu.runner import run

__all__ = ["CAPS", "CROSS_TOL", "GRACE_S", "PHASES", "SIZES", "Progress", "dist_stages", "markdown", "run"]

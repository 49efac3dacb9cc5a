"""DBD backdoor-defense training engine: FFCV data, on-the-fly attacks, DDP/DeepSpeed stages."""

import os

__version__ = "0.1.0"

# numba's TBB threading layer (its first choice where libtbb is installed, as it is beside
# OpenCV) deadlocks in interpreter shutdown when the process may run on one CPU only
# (numba/numba#10556): `dbd prepare` wrote its files and never exited under `taskset -c 0`,
# as under `srun --cpus-per-task=1`. The engine's numba code (FFCV's loaders and writer)
# runs on the OpenMP layer instead, unless the user chose a layer. Set before any import
# of numba, which reads it once.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")

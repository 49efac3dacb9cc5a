"""Throughput benchmarks: the engine against the reference way of feeding DBD, side by side.

``python -m benchmarks`` (or ``dbd bench``) runs the suite; results and how to read
them: benchmarks/RESULTS.md.
"""

import engine  # noqa: F401  (first: it picks numba's threading layer before anything imports numba)

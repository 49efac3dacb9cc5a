"""Backdoor attacks applied on the fly inside the FFCV pipeline (see README.md here).

``engine.attacks.runtime.build_poison`` is the entry point the pipeline uses; each
attack module holds its NumPy reference and the numba kernel the operations run.
"""

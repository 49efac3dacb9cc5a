"""Backdoor attacks applied on the fly inside the FFCV pipeline (see README.md here).

``engine.attacks.runtime.build_poison`` is the entry point the pipeline uses. The
attacks live in ``triggers/``, one file each, holding its config section, its NumPy
reference and the numba kernel the operations run; this folder holds the machinery they
share. Importing this package imports every file in ``triggers/``, and each ``Attack``
subclass registers itself in :data:`ATTACKS`: a new attack is one new file there.
"""
from engine.attacks import triggers
from engine.attacks.base import ATTACKS, Attack, AttackContext

ATTACKS.load(triggers)

__all__ = ["ATTACKS", "Attack", "AttackContext"]

"""Backdoor attacks applied on the fly inside the FFCV pipeline (see README.md here).

``engine.attacks.runtime.build_poison`` is the entry point the pipeline uses; each
attack module holds its config section, its NumPy reference and the numba kernel the
operations run. Importing this package imports every attack module (every module here
but the shared machinery below), and each ``Attack`` subclass registers itself in
:data:`ATTACKS`: a new attack is one new file.
"""
import importlib
import pkgutil

from engine.attacks.base import ATTACKS, Attack, AttackContext

# The shared machinery, not attacks; ``ops`` needs FFCV and is imported where used.
_MACHINERY = {"base", "config", "export", "ops", "plan", "preview", "runtime"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _MACHINERY:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ATTACKS", "Attack", "AttackContext"]

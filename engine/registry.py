"""The one way the engine registers named parts: stages, attacks, data sources, training
engines, backbones and commands.

Each kind has a ``Registry``. A part registers itself, by name, when its module is
imported: a class through ``Registered`` (a subclass that sets ``name`` is added), a
function or a module through ``registry.add``. ``registry.load(package)`` imports every
module of a package, so a new part is a new file in its folder and nothing else.
``registry.lookup(name, key)`` is the one lookup, with one clear error naming the config
key (or command line) and the known names.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from types import ModuleType
from typing import Any, ClassVar, Generic, TypeVar

from engine.errors import UserError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Name -> part, in registration order (the order help texts list them in)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind  # "stage", "attack", ...: how errors name a part

    def add(self, name: str, part: T) -> T:
        if name in self and self[name] is not part:
            raise RuntimeError(f"two {self.kind}s are named {name!r}: {self[name]!r} and {part!r}")
        self[name] = part
        return part

    def register(self, name: str):
        """A decorator: ``@SOURCES.register("cifar10")`` over a function adds it by name."""
        def add(part: T) -> T:
            return self.add(name, part)
        return add

    def lookup(self, name: str, key: str | None = None) -> T:
        """The part named ``name``; unknown: a UserError naming ``key`` and the known names."""
        if name in self:
            return self[name]
        near = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        what = f"config: {key} {name!r} is unknown" if key else f"unknown {self.kind} {name!r}"
        raise UserError(f"{what}{hint}: must be one of {', '.join(self)}")

    def load(self, package: ModuleType) -> "Registry[T]":
        """Import every module of ``package`` (in name order), so each registers its parts."""
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{package.__name__}.{module.name}")
        return self


class Registered:
    """Base of a registered class kind: ``registry`` is the kind's Registry, and every
    subclass that sets ``name`` in its own body is added to it."""

    registry: ClassVar[Registry]
    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.registry.add(cls.name, cls)

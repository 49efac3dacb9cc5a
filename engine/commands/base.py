"""What a ``dbd`` subcommand is, and the registry the CLI reads."""
from __future__ import annotations

import argparse
from typing import Callable, ClassVar

from engine.registry import Registered, Registry

COMMANDS: Registry = Registry("command")


class Command(Registered):
    """A subcommand: its name, one help line, its place in ``dbd -h`` and its two
    functions. A module defines ``add_arguments``/``main`` (importing its heavy parts inside
    ``main``, so ``dbd -h`` stays fast) and one subclass naming them."""

    registry = COMMANDS
    name: ClassVar[str]
    help: ClassVar[str]
    order: ClassVar[float]  # the workflow order: prepare first, bench last
    add_arguments: ClassVar[Callable[[argparse.ArgumentParser], None]]
    main: ClassVar[Callable[[argparse.Namespace], int]]

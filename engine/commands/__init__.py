"""One module per ``dbd`` subcommand: ``add_arguments(parser)``, ``main(args)`` and a
``Command`` subclass naming them (engine/commands/base.py). Importing this package
imports every module, and each command registers itself in :data:`COMMANDS`: a new
command is one new file here."""
import sys

from engine.commands.base import COMMANDS, Command

COMMANDS.load(sys.modules[__name__])

__all__ = ["COMMANDS", "Command"]

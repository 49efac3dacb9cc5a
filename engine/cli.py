"""The ``dbd`` command (also ``python -m engine``).

Each subcommand lives in ``engine/commands/<name>.py`` with ``add_arguments(parser)``,
``main(args) -> int`` and a ``Command`` naming them (its registry: engine/commands).
The modules import their heavy parts inside ``main``, so ``dbd inspect`` does not pay
for importing torch's distributed stack.
"""
from __future__ import annotations

import argparse
import os
import sys


def _commands() -> list:
    """Every registered command (engine/commands), in workflow order."""
    from engine.commands import COMMANDS

    return sorted(COMMANDS.values(), key=lambda c: c.order)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbd", description="DBD backdoor-defense training engine",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {c.name:<16} {c.help}" for c in _commands()))
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action=_Version, help="print the engine's version and commit and the "
                        "torch / FFCV / DeepSpeed versions, then exit")
    parser.add_argument("command", choices=[c.name for c in _commands()], metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments (COMMAND -h)")
    return parser


def version_text() -> str:
    """What ``dbd --version`` prints: enough to name the code a figure came from."""
    import platform
    from importlib import metadata

    from engine.runtime.cost import commit, environment

    versions = environment("cpu", None)["versions"]
    try:
        engine_version = metadata.version("dbd-engine")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        engine_version = "not installed"
    libs = ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items())
    return f"dbd-engine {engine_version} (commit {commit()})\n{libs}, Python {platform.python_version()}"


class _Version(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def build_command_parser(name: str) -> argparse.ArgumentParser:
    from engine.commands import COMMANDS

    command = COMMANDS.lookup(name)
    p = argparse.ArgumentParser(prog=f"dbd {name}", description=command.help)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    command.add_arguments(p)
    return p


def _strip_launcher_args(argv: list[str]) -> list[str]:
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment
    # carries the same fact, so the flag is dropped rather than declared everywhere.
    out = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    from engine.errors import UserError

    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    top = build_parser().parse_args(argv)
    args = build_command_parser(top.command).parse_args(top.args)
    debug = top.debug or args.debug
    try:
        from engine.commands import COMMANDS

        return int(COMMANDS.lookup(top.command).main(args) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

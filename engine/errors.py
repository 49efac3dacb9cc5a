"""The one exception type that reaches the user as a single line, not a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a bad config value, a corrupt dataset.

    The CLI prints ``error: <message>`` and exits with status 2 (1 for runtime
    failures); ``--debug`` shows the traceback.
    """


def check(ok: bool, key: str, msg: str) -> None:
    """A config value's validation: ``config: <key> <msg>`` as a UserError when not ``ok``."""
    if not ok:
        raise UserError(f"config: {key} {msg}")

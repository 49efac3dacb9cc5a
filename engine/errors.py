"""The one exception type that reaches the user as a single line, not a traceback."""


class UserError(Exception):
    """Bad input from the user: a missing file, a bad config value, a corrupt dataset.

    The CLI prints ``error: <message>`` and exits with status 2 (1 for runtime
    failures); ``--debug`` shows the traceback.
    """

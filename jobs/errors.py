"""The one exception type that means 'the user asked for something we cannot do' (exit code 2)."""


class UsageError(Exception):
    """A user mistake or bad input: printed as one line, exit code 2, no traceback."""

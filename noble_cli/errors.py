"""User-facing errors.

Anything a user can get wrong (a recipe name, a flag, a value, a missing data set) raises `NobleError` with one line
that names what was wrong and what is valid. The CLI prints that line and exits non-zero, with no traceback.
"""


class NobleError(Exception):
    """A mistake in the user's input or environment, reported as one line."""

    exit_code = 2


class InterruptedRun(NobleError):
    """A run stopped by Ctrl-C (or SIGTERM) after Lightning's graceful shutdown: resumable, exit status 130."""

    exit_code = 130


def choices_error(what: str, given: object, valid: list[str] | tuple[str, ...]) -> NobleError:
    """`unknown activation 'foo'; valid: a, b, c`."""
    return NobleError(f"unknown {what} {given!r}; valid: {', '.join(sorted(valid))}")

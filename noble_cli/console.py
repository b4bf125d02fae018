"""Consoles that read well where they are read: a terminal, or a log file (nohup, SLURM, CI).

rich sizes a console that is not a terminal at 80 columns, so tables fold their cells (a sweep's run ids one or two
characters wide) and long lines wrap mid-word. In a log nothing is gained by folding: such a console gets a width
no table here reaches, and callers print panels and live displays as plain lines there instead. $COLUMNS, when
set, is the user's choice and wins.
"""

from __future__ import annotations

import os
from typing import IO

from rich.console import Console

LOG_WIDTH = 1000  # "unbounded" for a log file: every table at its natural width, every message on one line
PROGRESS_SECONDS_ENV = "NOBLE_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


def make_console(stderr: bool = False, file: IO[str] | None = None, **kwargs) -> Console:
    """A rich Console as usual on a terminal; full width, no colour codes and no wrapping in a file or pipe."""
    console = Console(stderr=stderr, file=file, **kwargs)
    if not console.is_terminal and "width" not in kwargs and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, file=file, width=LOG_WIDTH, **kwargs)
    return console


def progress_seconds() -> float:
    """Seconds between two progress lines in a log ($NOBLE_PROGRESS_SECONDS, default 30)."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_PROGRESS_SECONDS
    except ValueError:
        from noble_cli.errors import NobleError

        raise NobleError(f"${PROGRESS_SECONDS_ENV} must be a number of seconds, got {raw!r}") from None
    return max(0.0, value)


def first_use_note(message: str) -> None:
    """A line on stderr when something is built on first use (data shards, a vocabulary): the wait is explained,
    and stdout (a run's progress, a command's tables) stays as it was."""
    make_console(stderr=True).print(message, highlight=False, markup=False)


def format_duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `2h07m`; `-` when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"

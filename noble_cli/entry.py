"""Running a Typer app the way every `noble` entry point does (the `noble` command, sweep array tasks)."""

from __future__ import annotations

import errno
import importlib
import sys

from rich.markup import escape

from noble_cli.console import make_console
from noble_cli.errors import InterruptedRun, NobleError


def _click_exceptions(name: str) -> tuple[type, ...]:
    """The click exception class `name` from typer's vendored click (typer >= 0.29) and from click itself."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _secondary_process() -> bool:
    """A process of a multi-device run other than global rank 0 (Lightning is imported by then)."""
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank != 0


def _in_data_cache(path: str) -> bool:
    from pathlib import Path

    from noble_cli.data.shards import data_root

    try:
        return Path(path).resolve().is_relative_to(data_root().resolve())
    except (OSError, ValueError):
        return False


def os_error_line(e: OSError) -> str:
    """What went wrong on the disk and what to do. Every file noble writes is written whole or not at all
    (noble_cli/atomic.py), so what was there before the error is intact."""
    where = e.filename or "the results folder"
    if e.filename and _in_data_cache(str(e.filename)):
        return (f"cannot write the data cache {where} ({e.strerror}); point $NOBLE_DATA_DIR at a folder with room "
                "that you can write to, and run the same command again")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on the device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return (f"{what} writing {where}; free some space (or pass --out a folder on another disk) and run the same "
                "command again (a run continues with --resume: its files are whole, as of its last checkpoint)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return f"cannot write {where} ({what}); pass --out a folder you can write to (nothing half-written was left)"
    return f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else str(e)


def run_app(app, prog_name: str | None = None) -> None:
    """Run a Typer app: user errors become one line on stderr and a non-zero exit, never a traceback."""
    err_console = make_console(stderr=True)  # an error stays one line in a log file
    try:
        # standalone_mode=False returns typer.Exit's code (Ctrl-C becomes 130) instead of raising it
        code = app(standalone_mode=False, prog_name=prog_name)
        if isinstance(code, int) and code:
            sys.exit(code)
    except NobleError as e:
        if isinstance(e, InterruptedRun) and _secondary_process():
            sys.exit(0)  # rank 0 reports it; a non-zero exit here would make Lightning kill rank 0 mid-shutdown
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)  # 2; 130 for an interrupted run
    except _click_exceptions("NoArgsIsHelpError") as e:
        e.show()
        sys.exit(0)
    except _click_exceptions("UsageError") as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        err_console.print(f"[bold red]error:[/] {escape(e.format_message() + hint)}", highlight=False,
                          soft_wrap=True)
        sys.exit(2)
    except OSError as e:  # an --out that is a file, a read-only or vanished folder, a full disk
        err_console.print(f"[bold red]error:[/] {escape(os_error_line(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except _click_exceptions("Abort"):
        err_console.print("[bold red]aborted[/]")
        sys.exit(130)
    except _click_exceptions("Exit") as e:
        sys.exit(e.exit_code)

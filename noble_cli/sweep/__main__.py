"""`python -m noble_cli.sweep run-entry MANIFEST [INDEX]`: what the launchers and SLURM array tasks run.

It loads only the sweep package (not the whole `noble` CLI), and reports user errors as one line like `noble` does.
"""

import sys

import click

from noble_cli.errors import NobleError
from noble_cli.sweep.cli import ablate_app


def main() -> None:
    try:
        rv = ablate_app(standalone_mode=False, prog_name="noble ablate")
        if isinstance(rv, int):  # typer returns an Exit's code instead of raising it when standalone_mode=False
            sys.exit(rv)
    except NobleError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except click.UsageError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)


if __name__ == "__main__":
    main()

"""`python -m noble_cli.sweep run-entry MANIFEST [INDEX]`: what the launchers and SLURM array tasks run.

It loads only the sweep package (not the whole `noble` CLI), and reports user errors as one line like `noble` does.
"""

from noble_cli.entry import run_app
from noble_cli.sweep.cli import ablate_app


def main() -> None:
    run_app(ablate_app, prog_name="noble ablate")


if __name__ == "__main__":
    main()

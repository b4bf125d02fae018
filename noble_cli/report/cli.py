"""`noble report`: the typer command (wired into the main app by noble_cli/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from noble_cli.console import make_console
from noble_cli.errors import NobleError
from noble_cli.parsing import split_list
from noble_cli.report.build import Report, load_report
from noble_cli.report.render import print_report, write_csv, write_markdown

FORMATS = ("md", "csv")


def parse_formats(value: str) -> list[str]:
    """'md,csv' -> ['md', 'csv']; raises NobleError naming the valid formats."""
    items = [v.lower() for v in split_list(value)]
    if not items:
        raise NobleError(f"--format is empty; valid: {', '.join(FORMATS)} (comma-separated, e.g. md,csv)")
    for v in items:
        if v not in FORMATS:
            raise NobleError(f"unknown report format {v!r}; valid: {', '.join(FORMATS)} (comma-separated, e.g. md,csv)")
    return list(dict.fromkeys(items))


def write_report(rep: Report, out: Path, formats: list[str], plots: bool = True) -> list[Path]:
    """Write the requested files (report.md; report.csv and runs.csv; PNGs) into `out`; returns their paths."""
    written: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    pngs: list[Path] = []
    if plots:
        from noble_cli.report.plots import (
            make_plots,  # matplotlib is imported only when plotting
        )

        pngs = make_plots(rep, out)
    if "csv" in formats:
        written += write_csv(rep, out)
    if "md" in formats:
        written.append(write_markdown(rep, out, pngs))
    return written + pngs


def report(
    results: Annotated[Path, typer.Argument(help="Results folder to search for run folders (any depth).")] = Path(
        "results"),
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the report files "
                                                "(default: RESULTS/report).")] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="Files to write, comma-separated: md, csv.")] = "md,csv",
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots (eval loss curves, speedup "
                                        "bars).")] = True,
    sweep: Annotated[Optional[list[str]], typer.Option(
        "--sweep", metavar="NAME", help="Only the runs of this sweep (its name under RESULTS/sweeps/; repeatable): "
        "studies that share runs in one results folder each get their own report.")] = None,
) -> None:
    """Compare NOBLE variants with their baselines and controls: speedups, overheads, eval losses, over seeds.

    Finds every run folder (one holding meta.json) under RESULTS, pairs each variant with the baseline of the same
    recipe, budget and seed, and reports per variant: steps to reach the baseline's best eval loss, step and
    wall-clock speedup (mean and 95% CI over seeds, or an upper bound where some seed did not reach it), parameter
    and FLOPs overhead, step-time overhead (or "noise" where timing noise exceeds it), final eval loss (and bits
    per byte) and its change with a paired t-test; where one comparison tests several variants, p-values come with
    q-values adjusted for it (Benjamini-Hochberg). NOBLE rows are also compared with the dense-matched and
    init-only controls of their pair. A recipe run under several settings (Mixup/CutMix on and off, AdamW and
    Muon) also gets one paired test per variant of whether the setting changes its effect. Broken, running or
    unpaired run folders are listed as skipped. Prints headlines and tables and writes report.md, report.csv,
    controls.csv, settings.csv, runs.csv and PNG plots into --out.
    """
    formats = parse_formats(format)
    out_dir = out if out is not None else results / "report"
    rep = load_report(results, exclude=out_dir, sweeps=sweep or None)
    written = write_report(rep, out_dir, formats, plots)
    print_report(rep, make_console(), written)
    if rep.summary.empty:
        raise NobleError(f"no usable runs under {results}: all {len(rep.skipped)} run folders were skipped "
                         f"(reasons above and in {out_dir})")

"""report: compare NOBLE variants with their baselines across run folders (`noble report`).

Pure API: `build_report(results_dir) -> (runs_table, summary_table, skipped)`; `load_report` returns the same plus
the loaded runs (for plots). Rendering lives in `render`, PNGs in `plots`, the typer command in `cli`.
"""

from noble_cli.report.build import Report, build_report, load_report

__all__ = ["Report", "build_report", "load_report"]

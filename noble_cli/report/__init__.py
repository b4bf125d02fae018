"""report: compare NOBLE variants with their baselines across run folders (`noble report`).

Pure API: `build_report(results_dir) -> (runs_table, summary_table, skipped)`; `load_report` returns the same plus
the loaded runs (for plots). Modules: `runs` (reading run folders), `figures` (per-run figures and the summary
over seeds), `stats` (CIs and p-values), `settings` (a recipe under several settings), `build` (the pure API),
`cells` and `headlines` (what the tables and headlines say), `render` (terminal, report.md, CSVs), `plots`
(PNGs), `cli` (the typer command).
"""

from noble_cli.report.build import Report, build_report, load_report

__all__ = ["Report", "build_report", "load_report"]

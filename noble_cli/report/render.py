"""Rendering the report: a rich table for the terminal, report.md, report.csv (and runs.csv)."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from noble_cli.report.build import Report
from noble_cli.report.figures import RUN_COLUMNS, SUMMARY_COLUMNS

NOT_REACHED = "not reached"

# report.csv: the summary table; overheads are fractions (0.05 = +5%), speedups ratios, NaN cells empty.
CSV_COLUMNS = [c for c in SUMMARY_COLUMNS]


def _nan(v) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def _pm(mean: float, std: float, fmt: str, suffix: str = "") -> str:
    if _nan(mean):
        return "n/a"
    s = f"{mean:{fmt}}{suffix}"
    if not _nan(std):
        s += f" ± {std:{fmt.lstrip('+')}}"
    return s


def _pct(mean: float, std: float = math.nan) -> str:
    if _nan(mean):
        return "n/a"
    s = f"{100 * mean:+.1f}%"
    if not _nan(std):
        s += f" ± {100 * std:.1f}"
    return s


def _p(p: float) -> str:
    if _nan(p):
        return ""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _has_top1(summary: pd.DataFrame) -> bool:
    return "best_top1" in summary.columns and summary["best_top1"].notna().any()


def display_rows(summary: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """(headers, rows of strings, is_best per row) shared by the terminal and markdown tables."""
    top1 = _has_top1(summary)
    multi_budget = summary.groupby("recipe")["pair_key"].nunique().gt(1).any() if not summary.empty else False
    headers = ["recipe", "variant", "n", "reached", "steps to target", "step speedup", "wall-clock speedup",
               "params", "step time", "final eval loss", "Δ vs baseline", "p (Δ)"]
    if multi_budget:  # a recipe run under several settings (budget, lr, ...): say which rows belong together
        headers.insert(1, "setting")
    if top1:
        headers.append("best top-1")
    rows, best = [], []
    for _, r in summary.iterrows():
        reached_none = r["reached_k"] == 0
        if r["is_baseline"]:
            stt = _pm(r["steps_to_target"], r["steps_to_target_std"], ".0f")
            sp, wsp = "1.00x", "1.00x"
        elif reached_none:
            stt = sp = wsp = NOT_REACHED
        else:
            stt = _pm(r["steps_to_target"], r["steps_to_target_std"], ".0f")
            sp = _pm(r["step_speedup"], r["step_speedup_std"], ".2f", "x")
            wsp = _pm(r["wallclock_speedup"], r["wallclock_speedup_std"], ".2f", "x")
        cells = [
            str(r["recipe"]), str(r["variant"]), str(r["n"]), str(r["reached"]), stt, sp, wsp,
            "—" if r["is_baseline"] else _pct(r["param_overhead"]),
            "—" if r["is_baseline"] else _pct(r["step_time_overhead"], r["step_time_overhead_std"]),
            _pm(r["final_eval_loss"], r["final_eval_loss_std"], ".4f"),
            "—" if r["is_baseline"] else _pm(r["final_eval_loss_delta"], r["final_eval_loss_delta_std"], "+.4f"),
            "" if r["is_baseline"] else _p(r["p_value"]),
        ]
        if multi_budget:
            budget = "" if _nan(r["max_steps"]) else f"{int(r['max_steps'])} steps, "
            cells.insert(1, f"{budget}pair {str(r['pair_key'])[:8]}")
        if top1:
            cells.append(_pm(100 * r["best_top1"], 100 * r["best_top1_std"], ".2f", "%"))
        rows.append(cells)
        best.append(bool(r["best"]))
    return headers, rows, best


def rich_table(summary: pd.DataFrame, title: str = "NOBLE report") -> Table:
    headers, rows, best = display_rows(summary)
    table = Table(title=title, caption="speedups are means over the seeds that reached the target; "
                                       "best variant in bold green")
    right = {"n", "reached", "steps to target", "step speedup", "wall-clock speedup", "params", "step time",
             "final eval loss", "Δ vs baseline", "p (Δ)", "best top-1"}
    for h in headers:
        # fold, never truncate: a narrow terminal must still show every figure whole
        table.add_column(h, justify="right" if h in right else "left", overflow="fold")
    prev_key = None
    keys = list(zip(summary["recipe"], summary["pair_key"])) if not summary.empty else []
    for cells, is_best, key in zip(rows, best, keys):
        if prev_key is not None and key != prev_key:
            table.add_section()
        prev_key = key
        table.add_row(*[escape(c) for c in cells], style="bold green" if is_best else None)
    return table


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def print_report(rep: Report, console: Console | None = None, written: list[Path] | None = None) -> None:
    console = console or Console()
    if rep.summary.empty:
        console.print(f"[bold]No usable runs under {escape(str(rep.results_dir))}.[/bold]")
    else:
        console.print(rich_table(rep.summary))
        diverged = rep.runs_table[rep.runs_table["status"] == "diverged"]
        for _, r in diverged.iterrows():
            console.print(f"[yellow]note:[/yellow] {escape(str(r['run_id']))} ({escape(str(r['variant']))}, "
                          f"seed {r['seed']}) diverged; its figures use the eval points before that")
    if rep.skipped:
        t = Table(title=f"Skipped ({len(rep.skipped)})", title_style="bold yellow")
        t.add_column("run folder")
        t.add_column("reason")
        for path, reason in rep.skipped:
            t.add_row(escape(_rel(path, rep.results_dir)), escape(reason))
        console.print(t)
    if written:
        console.print("Wrote " + ", ".join(escape(str(p)) for p in written))


def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: list[str], rows: list[list[str]], bold: list[bool] | None = None) -> str:
    bold = bold or [False] * len(rows)
    out = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
    for cells, b in zip(rows, bold):
        cells = [f"**{_md_escape(c)}**" if b and c else _md_escape(c) for c in cells]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _run_rows(runs_table: pd.DataFrame, root: Path) -> tuple[list[str], list[list[str]]]:
    headers = ["recipe", "variant", "seed", "run", "status", "target", "steps to target", "step speedup",
               "wall-clock speedup", "step time (s)", "final eval loss"]
    rows = []
    for _, r in runs_table.iterrows():
        reached = bool(r["reached"])
        rows.append([
            str(r["recipe"]), str(r["variant"]), str(r["seed"]), str(r["run_id"]), str(r["status"]),
            f"{r['target']:.4f}",
            f"{r['steps_to_target']:.1f}" if reached else NOT_REACHED,
            f"{r['step_speedup']:.3f}x" if reached else NOT_REACHED,
            (f"{r['wallclock_speedup']:.3f}x" if not _nan(r["wallclock_speedup"]) else "n/a") if reached
            else NOT_REACHED,
            "n/a" if _nan(r["median_step_time_s"]) else f"{r['median_step_time_s']:.4g}",
            f"{r['final_eval_loss']:.4f}",
        ])
    return headers, rows


DEFINITIONS = """\
- **target**: the baseline's best eval loss (same recipe, pair key, i.e. budget and everything but the branch, and seed).
- **steps to target**: first step where the variant's eval loss <= target, linearly interpolated between the two eval
  points around it; "not reached" if never.
- **step speedup**: baseline's step of its best eval loss / variant's steps to target.
- **wall-clock speedup**: baseline's training time (wallclock_s, evaluation excluded) at its best step / variant's
  training time at steps to target (interpolated).
- **params**, **step time**: parameter overhead params/params(baseline) - 1; step-time overhead median step time /
  baseline's - 1 (warm-up excluded).
- Across seeds: mean ± sample std (ddof=1, none for n=1), runs paired by seed. Speedups and steps to target average
  over the seeds that reached the target only (see "reached"). p (Δ): two-sided paired t-test of the final eval loss
  against the baseline's (n >= 2).
"""


def to_markdown(rep: Report, plots: list[Path] | None = None, out_dir: Path | None = None) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# NOBLE report\n\nResults: `{rep.results_dir}` · {len(rep.runs_table)} runs used, "
             f"{len(rep.skipped)} skipped · generated {now}\n"]
    if rep.summary.empty:
        parts.append("No usable runs.\n")
    else:
        headers, rows, best = display_rows(rep.summary)
        parts.append("## Summary\n\n" + markdown_table(headers, rows, best) +
                     "\n\nBest variant per recipe in **bold**.\n")
        parts.append("## Definitions\n\n" + DEFINITIONS)
        diverged = rep.runs_table[rep.runs_table["status"] == "diverged"]
        if not diverged.empty:
            parts.append("## Diverged runs\n\n" + "\n".join(
                f"- `{r['run_id']}` ({_md_escape(r['variant'])}, seed {r['seed']}): figures use the eval points "
                f"before divergence" for _, r in diverged.iterrows()) + "\n")
        h, rr = _run_rows(rep.runs_table, rep.results_dir)
        parts.append("## Runs\n\n" + markdown_table(h, rr) + "\n")
    if plots:
        base = out_dir or Path(".")
        parts.append("## Plots\n\n" + "\n\n".join(f"![{p.stem}]({_rel(p, base)})" for p in plots) + "\n")
    parts.append(f"## Skipped ({len(rep.skipped)})\n\n" + ("\n".join(
        f"- `{_rel(p, rep.results_dir)}`: {_md_escape(reason)}" for p, reason in rep.skipped) or "None.") + "\n")
    return "\n".join(parts)


def write_csv(rep: Report, out_dir: Path) -> list[Path]:
    """report.csv (summary, one row per variant) and runs.csv (one row per run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path, runs_path = out_dir / "report.csv", out_dir / "runs.csv"
    rep.summary.reindex(columns=CSV_COLUMNS).to_csv(summary_path, index=False, na_rep="")
    rep.runs_table.reindex(columns=RUN_COLUMNS).to_csv(runs_path, index=False, na_rep="")
    return [summary_path, runs_path]


def write_markdown(rep: Report, out_dir: Path, plots: list[Path] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(to_markdown(rep, plots, out_dir))
    return path

"""Writing the report out: the terminal (rich), report.md, report.csv, controls.csv, settings.csv and runs.csv.
What each cell says is decided in report/cells.py, the headlines in report/headlines.py."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from noble_cli.console import make_console
from noble_cli.report.build import Report
from noble_cli.report.cells import (
    NOT_REACHED,
    control_rows,
    display_rows,
    is_nan,
    provenance_rows,
    setting_rows,
)
from noble_cli.report.extras import EXTRAS
from noble_cli.report.figures import RUN_COLUMNS, SUMMARY_COLUMNS
from noble_cli.report.headlines import headlines, setting_headlines
from noble_cli.report.settings import SETTING_COLUMNS
from noble_cli.roles import CONTROL_ROLES

# report.csv: the summary table; overheads are fractions (0.05 = +5%), speedups ratios, NaN cells empty.
CSV_COLUMNS = list(SUMMARY_COLUMNS)


# --- terminal ------------------------------------------------------------------------------------------------------
_RIGHT = {"n", "reached", "steps to target", "step speedup [95% CI]", "p (speedup)", "wall-clock speedup", "params",
          "FLOPs/step", "step time", "final eval loss", "Δ final loss [95% CI]", "p (Δ)",
          *(h for e in EXTRAS for h in (e.label, f"Δ {e.name} [95% CI]"))}


def _table(headers: list[str], rows: list[list[str]], keys: list, best: list[bool] | None, title: str,
           caption: str) -> Table:
    table = Table(title=title, caption=caption)
    for h in headers:
        # fold, never truncate: a narrow terminal must still show every figure whole
        table.add_column(h, justify="right" if h in _RIGHT else "left", overflow="fold")
    prev = None
    for i, (cells, key) in enumerate(zip(rows, keys)):
        if prev is not None and key != prev:
            table.add_section()
        prev = key
        table.add_row(*[escape(c) for c in cells], style="bold green" if best and best[i] else None)
    return table


def rich_table(summary: pd.DataFrame, title: str = "NOBLE report: every row vs its baseline") -> Table:
    headers, rows, best = display_rows(summary)
    keys = list(zip(summary["recipe"], summary["pair_key"])) if not summary.empty else []
    return _table(headers, rows, keys, best, title,
                  "speedup: mean [95% CI] when every seed reached the target, '< x' an upper bound when some did "
                  "not; 'noise': timing spread > the effect; best variant (every seed reached) in bold green")


def _code_version(meta: dict) -> str:
    commit = str(meta.get("git_commit") or "unknown")
    return (commit[:10] if commit != "unknown" else "unknown commit") + (
        " + uncommitted changes" if meta.get("git_dirty") else "")


def code_versions_warning(rep: Report) -> str | None:
    """One line when the reported runs come from more than one version of the code (meta.json's git commit and
    dirty flag): a speedup between runs of two versions may be the code's, not NOBLE's. None when they agree."""
    versions: dict[str, list[str]] = {}
    for r in rep.runs:
        versions.setdefault(_code_version(r.meta), []).append(r.run_id)
    if len(versions) <= 1:
        return None
    of_run = {rid: v for v, rids in versions.items() for rid in rids}
    crossed = 0
    if not rep.runs_table.empty:
        for rid, base in zip(rep.runs_table["run_id"], rep.runs_table["baseline_run_id"]):
            crossed += rid != base and rid in of_run and base in of_run and of_run[rid] != of_run[base]
    listed = "; ".join(f"{v}: {len(rids)} run{'s' * (len(rids) != 1)}"
                       for v, rids in sorted(versions.items(), key=lambda kv: -len(kv[1])))
    pairs = (f"{crossed} comparison{'s' * (crossed != 1)} pair a run with a baseline of another version, so a "
             "difference may be the code's, not NOBLE's" if crossed else
             "each comparison stays within one version")
    return (f"these runs come from {len(versions)} versions of the code ({listed}); {pairs}. Retrain the older runs "
            "with this code, or report each version's runs apart (noble report --sweep NAME, or separate results "
            "folders)")


def print_report(rep: Report, console: Console | None = None, written: list[Path] | None = None) -> None:
    console = console or make_console()
    warning = code_versions_warning(rep)
    if warning:
        console.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False)
    if rep.summary.empty:
        console.print(f"[bold]No usable runs under {escape(str(rep.results_dir))}.[/bold]")
    else:
        for title, lines in headlines(rep) + setting_headlines(rep):
            console.print(f"[bold]{escape(title)}[/bold]")
            for line in lines:
                console.print(f"  • {escape(line)}")
        console.print(rich_table(rep.summary))
        if not rep.controls.empty:
            h, rows = control_rows(rep.controls)
            keys = list(zip(rep.controls["recipe"], rep.controls["pair_key"], rep.controls["reference"]))
            console.print(_table(h, rows, keys, None, "NOBLE vs the controls of its pair (target: the control's "
                                 "best eval loss)", "dense-matched: no branch, the same parameter count; init-only: "
                                 "no branch, NOBLE's main-weight re-init"))
        if not rep.settings.empty:
            h, rows = setting_rows(rep.settings)
            keys = list(zip(rep.settings["recipe"], rep.settings["setting_a"], rep.settings["setting_b"]))
            console.print(_table(h, rows, keys, None, "How the setting changes each variant's effect (a - b)",
                                 "each variant's Δ vs its own setting's baseline, seed by seed; a - b paired over "
                                 "seeds"))
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


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


# --- markdown ------------------------------------------------------------------------------------------------------
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


def _run_rows(runs_table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["recipe", "variant", "seed", "run", "status", "target", "steps to target", "step speedup",
               "wall-clock speedup", "step time (s)", "step-time spread", "final eval loss"]
    rows = []
    for _, r in runs_table.iterrows():
        reached = bool(r["reached"])
        bound = r["step_speedup_bound"]
        rows.append([
            str(r["recipe"]), str(r["variant"]), str(r["seed"]), str(r["run_id"]), str(r["status"]),
            f"{r['target']:.4f}",
            f"{r['steps_to_target']:.1f}" if reached else f"> {r['budget']:.0f}",
            f"{r['step_speedup']:.3f}x" if reached else (f"< {bound:.3f}x" if not is_nan(bound) else NOT_REACHED),
            (f"{r['wallclock_speedup']:.3f}x" if not is_nan(r["wallclock_speedup"]) else "n/a") if reached
            else NOT_REACHED,
            "n/a" if is_nan(r["median_step_time_s"]) else f"{r['median_step_time_s']:.4g}",
            "n/a" if is_nan(r["step_time_spread"]) else f"±{100 * r['step_time_spread']:.0f}%",
            f"{r['final_eval_loss']:.4f}",
        ])
    return headers, rows


DEFINITIONS = """\
- **target**: the reference's best eval loss, seed by seed (the baseline's in the main table; the control's in the
  comparisons with the controls), same recipe and pair key (budget and everything but the branch).
- **steps to target**: first step where the variant's eval loss <= target, linearly interpolated between the two eval
  points around it. "> N" where some seed never reached it: a lower bound of the mean (its budget for those seeds).
- **step speedup**: the reference's step of its best eval loss / the variant's steps to target. When every seed
  reached the target: mean over seeds [95% t confidence interval], and p (speedup), the two-sided one-sample
  t-test of the speedups against 1. When some seed did not: no mean over the seeds that did (it would favour the
  variant) but "< x", an upper bound of the mean over all seeds: a seed that never reached has speedup < the
  reference's best step / its budget. "not reached" when no seed did. Never the best variant.
- **wall-clock speedup**: the reference's training time (evaluation excluded) at its best step / the variant's at
  steps to target; bounds as for the step speedup.
- **step time**: median step time / the baseline's - 1 (warm-up excluded), mean [95% CI]; the baseline row gives its
  median step time ± std over seeds. **noise ±X%**: the timing noise, the larger of the spread of the baseline's
  median step time across seeds (std / mean) and the typical within-run spread (a relative std of step_time_s:
  interquartile range / 1.349 / median), is larger than the step-time difference (or its CI contains 0):
  neither the step-time overhead nor the wall-clock speedup is then reported, since on a shared machine they would
  be noise. **n/a (1 seed)**: one pair of runs cannot tell the branch's cost from a change of load between them.
  With equal step times the wall-clock speedup is the step speedup.
- **params**: params / params(baseline) - 1. **FLOPs/step**: FLOPs of a training step (forward and backward,
  counted once per run by Lightning's measure_flops on the meta device: matmuls, convolutions and attention, so the
  floor) / the baseline's - 1, and the extra FLOPs per token (image); "-" for runs that did not record them.
- **Δ final loss**: the final eval loss minus the baseline's, seed by seed: mean [95% CI] and p (Δ), the paired
  t-test; negative is better. The extras, where a run logs them, the same way: **bpb** (language models'
  eval_bpb, final: the loss in bits per byte), best **top-1** (classifiers), best **masked-token acc.** (masked
  LMs), best **PSNR** (the VQGAN); for these three higher is better.
- **q**: where one comparison tests several variants (several activations, ranks or layer sets against one
  baseline or control), a p-value below 0.05 is likely for one of them by chance alone; q is the p-value adjusted
  for that (Benjamini-Hochberg over the variants of the comparison, scipy.stats.false_discovery_control), shown as
  "p (q ...)" and in the headline as "q = ... over k variants". A finding a reader should rely on has q < 0.05 too.
- **n** is the number of seeds, runs paired by seed; report.csv also gives every figure's sample std (`*_std`,
  ddof 1) beside its mean and CI.
- **a - b** (a recipe under several settings, e.g. Mixup/CutMix on and off, AdamW and Muon): a variant's Δ vs its
  own setting's baseline under setting a minus that under setting b, seed by seed, over the seeds both have: mean
  [95% CI] and the paired t-test's p, with its q over the variants tested between the same two settings. It tests
  whether the setting changes the variant's effect (a CI that contains 0: not shown to); two separate verdicts,
  one significant and one not, do not show that. The step-speedup difference only where every seed reached the
  target under both.
- **Controls**: *dense-matched*: no branch, MLP widened to NOBLE's parameter count; *init-only*: no branch, the
  targeted layers' main weights re-initialised as NOBLE does (N(0, (s/sqrt(in))^2)); *own-init*: NOBLE keeping the
  model's own init (`noble.main_init_scale=null`). The paper's NOBLE changes the main weights' init too, so a
  speedup over the baseline that the init-only control shares is the init's, not the branch's.
"""


def to_markdown(rep: Report, plots: list[Path] | None = None, out_dir: Path | None = None) -> str:
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# NOBLE report\n\nResults: `{rep.results_dir}` · {len(rep.runs_table)} runs used, "
             f"{len(rep.skipped)} skipped · generated {now}\n"]
    warning = code_versions_warning(rep)
    if warning:
        parts.append(f"> **Warning:** {_md_escape(warning)}\n")
    if rep.summary.empty:
        parts.append("No usable runs.\n")
    else:
        heads = []
        for title, lines in headlines(rep) + setting_headlines(rep):
            heads.append(f"### {_md_escape(title)}\n\n" + "\n".join(f"- {_md_escape(x)}" for x in lines) + "\n")
        parts.append("## Headline\n\n" + "\n".join(heads))
        headers, rows, best = display_rows(rep.summary)
        parts.append("## Every variant vs the baseline\n\n" + markdown_table(headers, rows, best) +
                     "\n\nBest variant per comparison in **bold** (only among variants that reached the target in "
                     "every seed).\n")
        if not rep.controls.empty:
            for role, name in CONTROL_ROLES.items():
                sub = rep.controls[rep.controls["reference_role"] == role]
                if sub.empty:
                    continue
                h, rr = control_rows(sub)
                parts.append(f"## NOBLE vs {name}\n\nTarget: the control's best eval loss, seed by seed.\n\n"
                             + markdown_table(h, rr) + "\n")
        if not rep.settings.empty:
            h, rr = setting_rows(rep.settings)
            parts.append("## How the setting changes each variant's effect\n\nEach variant's Δ against its own "
                         "setting's baseline, seed by seed, under setting a and b, and a - b paired over the seeds "
                         "(a difference in differences; see Definitions).\n\n" + markdown_table(h, rr) + "\n")
        parts.append("## Definitions\n\n" + DEFINITIONS)
        diverged = rep.runs_table[rep.runs_table["status"] == "diverged"]
        if not diverged.empty:
            parts.append("## Diverged runs\n\n" + "\n".join(
                f"- `{r['run_id']}` ({_md_escape(r['variant'])}, seed {r['seed']}): figures use the eval points "
                f"before divergence" for _, r in diverged.iterrows()) + "\n")
        h, rr = _run_rows(rep.runs_table)
        parts.append("## Runs\n\n" + markdown_table(h, rr) + "\n")
        h, rr = provenance_rows(rep.runs)
        parts.append("## Provenance\n\nWhere and with what the runs above were trained (each run folder's meta.json "
                     "and summary.json; training time excludes evaluation).\n\n" + markdown_table(h, rr) + "\n")
    if plots:
        base = out_dir or Path(".")
        parts.append("## Plots\n\n" + "\n\n".join(f"![{p.stem}]({_rel(p, base)})" for p in plots) + "\n")
    parts.append(f"## Skipped ({len(rep.skipped)})\n\n" + ("\n".join(
        f"- `{_rel(p, rep.results_dir)}`: {_md_escape(reason)}" for p, reason in rep.skipped) or "None.") + "\n")
    return "\n".join(parts)


def write_csv(rep: Report, out_dir: Path) -> list[Path]:
    """report.csv (summary, one row per variant vs its baseline), controls.csv (NOBLE rows vs the controls),
    settings.csv (how a recipe's settings change each variant's effect), the two when there are any, and runs.csv
    (one row per run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path, runs_path = out_dir / "report.csv", out_dir / "runs.csv"
    rep.summary.reindex(columns=CSV_COLUMNS).to_csv(summary_path, index=False, na_rep="")
    rep.runs_table.reindex(columns=RUN_COLUMNS).to_csv(runs_path, index=False, na_rep="")
    written = [summary_path, runs_path]
    for path, table, columns in ((out_dir / "controls.csv", rep.controls, CSV_COLUMNS),
                                 (out_dir / "settings.csv", rep.settings, SETTING_COLUMNS)):
        if not table.empty:
            table.reindex(columns=columns).to_csv(path, index=False, na_rep="")
            written.insert(-1, path)
        else:
            path.unlink(missing_ok=True)  # a stale one from an earlier report would mislead
    return written


def write_markdown(rep: Report, out_dir: Path, plots: list[Path] | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(to_markdown(rep, plots, out_dir))
    return path

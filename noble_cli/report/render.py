"""Rendering the report: headlines, a rich table for the terminal, report.md, report.csv, controls.csv, settings.csv,
runs.csv.

What a cell says is decided once, here, for the terminal and report.md alike:
- a speedup is a mean with its 95% CI only when every seed reached the target; otherwise it is an upper bound
  ("< 0.98x", with "not reached" when no seed did), never the mean of the seeds that happened to reach;
- a step-time or wall-clock figure whose timing noise is larger than the effect reads "noise ±X%";
- FLOPs come from meta.json; older run folders without them show "-".
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from noble_cli.console import make_console
from noble_cli.report.build import Report
from noble_cli.report.figures import CONTROL_ROLES, RUN_COLUMNS, SUMMARY_COLUMNS
from noble_cli.report.settings import SETTING_COLUMNS, setting_names

NOT_REACHED = "not reached"
MISSING = "-"

# report.csv: the summary table; overheads are fractions (0.05 = +5%), speedups ratios, NaN cells empty.
CSV_COLUMNS = list(SUMMARY_COLUMNS)


def _nan(v) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def _ci(mean: float, low: float, high: float, fmt: str, suffix: str = "") -> str:
    """'1.53x [0.40, 2.66]'; the mean alone where there is no interval (one seed, or no spread)."""
    if _nan(mean):
        return "n/a"
    s = f"{mean:{fmt}}{suffix}"
    if not _nan(low) and not _nan(high):
        s += f" [{low:{fmt}}, {high:{fmt}}]"
    return s


def _pm(mean: float, std: float, fmt: str, suffix: str = "") -> str:
    if _nan(mean):
        return "n/a"
    s = f"{mean:{fmt}}{suffix}"
    if not _nan(std):
        s += f" ± {std:{fmt.lstrip('+')}}"
    return s


def _p(p: float) -> str:
    if _nan(p):
        return ""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _si(v: float) -> str:
    """1.23e9 -> '1.23G' (FLOPs)."""
    a = abs(v)
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if a >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _item(flops_item: str) -> str:
    item = str(flops_item or "item")
    return item[:-1] if item.endswith("s") else item


def _has(summary: pd.DataFrame, col: str) -> bool:
    return col in summary.columns and summary[col].notna().any()


# --- cells ---------------------------------------------------------------------------------------------------------
def speedup_cell(r: pd.Series, col: str = "step_speedup") -> str:
    """Mean [95% CI] when every seed reached the target; an upper bound ("< 0.98x") when some did not."""
    if r["is_baseline"]:
        return "1.00x"
    if r["reached_k"] < r["n"]:
        bound = r[f"{col}_bound"]
        shown = f"< {bound:.2f}x" if not _nan(bound) else "n/a"
        return f"{NOT_REACHED} ({shown})" if r["reached_k"] == 0 else shown
    return _ci(r[col], r[f"{col}_ci_low"], r[f"{col}_ci_high"], ".2f", "x")


def noise_cell(r: pd.Series) -> str:
    if int(r["n"]) < 2:
        return "n/a (1 seed)"
    return f"noise ±{100 * r['timing_noise']:.0f}%" if not _nan(r["timing_noise"]) else "noise (CI spans 0)"


def wallclock_cell(r: pd.Series) -> str:
    if r["is_baseline"]:
        return "1.00x"
    if r["timing_noisy"]:
        return noise_cell(r)
    return speedup_cell(r, "wallclock_speedup")


def step_time_cell(r: pd.Series) -> str:
    if r["is_baseline"]:
        ms = r["median_step_time_s"] * 1000
        std = r["median_step_time_s_std"] * 1000
        return "n/a" if _nan(ms) else _pm(ms, std, ".3g", " ms")
    if r["timing_noisy"]:
        return noise_cell(r)
    if _nan(r["step_time_overhead"]):
        return "n/a"
    lo, hi = r["step_time_overhead_ci_low"], r["step_time_overhead_ci_high"]
    s = f"{100 * r['step_time_overhead']:+.1f}%"
    return s + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if not _nan(lo) else "")


def flops_cell(r: pd.Series) -> str:
    if r["is_baseline"]:
        return MISSING if _nan(r["flops_per_step"]) else f"{_si(r['flops_per_step'])}/step"
    if _nan(r["flops_overhead"]):
        return MISSING
    s = f"{100 * r['flops_overhead']:+.1f}%"
    if not _nan(r["extra_flops_per_item"]):
        sign = "+" if r["extra_flops_per_item"] >= 0 else ""
        s += f" ({sign}{_si(r['extra_flops_per_item'])}/{_item(r['flops_item'])})"
    return s


def steps_cell(r: pd.Series) -> str:
    if r["reached_k"] < r["n"]:
        return f"> {r['steps_to_target_bound']:.0f}" if not _nan(r["steps_to_target_bound"]) else NOT_REACHED
    return _ci(r["steps_to_target"], r["steps_to_target_ci_low"], r["steps_to_target_ci_high"], ".0f")


def delta_cell(r: pd.Series, col: str, fmt: str = "+.4f", scale: float = 1.0, suffix: str = "") -> str:
    if r["is_baseline"]:
        return "—"
    return _ci(scale * r[col], scale * r[f"{col}_ci_low"], scale * r[f"{col}_ci_high"], fmt, suffix)


def _setting(r: pd.Series, names: dict[tuple, str]) -> str:
    budget = "" if _nan(r["max_steps"]) else f"{int(r['max_steps'])} steps, "
    return budget + names.get((r["recipe"], r["pair_key"]), f"pair {str(r['pair_key'])[:8]}")


def _multi_setting(summary: pd.DataFrame) -> bool:
    return bool(not summary.empty and summary.groupby("recipe")["pair_key"].nunique().gt(1).any())


def display_rows(summary: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """(headers, rows of strings, is_best per row) of the main table (every row vs its baseline)."""
    bpb, top1, multi = _has(summary, "final_eval_bpb"), _has(summary, "best_top1"), _multi_setting(summary)
    headers = ["recipe", "variant", "n", "reached", "steps to target", "step speedup [95% CI]", "p (speedup)",
               "wall-clock speedup", "params", "FLOPs/step", "step time", "final eval loss",
               "Δ final loss [95% CI]", "p (Δ)"]
    if multi:  # a recipe run under several settings (budget, lr, ...): say which rows belong together
        headers.insert(1, "setting")
        names = setting_names(summary)
    if bpb:
        headers += ["final bpb", "Δ bpb [95% CI]"]
    if top1:
        headers += ["best top-1", "Δ top-1 [95% CI]"]
    rows, best = [], []
    for _, r in summary.iterrows():
        base = bool(r["is_baseline"])
        cells = [
            str(r["recipe"]), str(r["variant"]), str(r["n"]), str(r["reached"]), steps_cell(r), speedup_cell(r),
            "" if base else _p(r["p_value_speedup"]), wallclock_cell(r),
            "—" if base else ("n/a" if _nan(r["param_overhead"]) else f"{100 * r['param_overhead']:+.1f}%"),
            flops_cell(r), step_time_cell(r), _pm(r["final_eval_loss"], r["final_eval_loss_std"], ".4f"),
            delta_cell(r, "final_eval_loss_delta"), "" if base else _p(r["p_value"]),
        ]
        if multi:
            cells.insert(1, _setting(r, names))
        if bpb:
            cells += [_pm(r["final_eval_bpb"], r["final_eval_bpb_std"], ".4f"),
                      delta_cell(r, "final_eval_bpb_delta")]
        if top1:
            cells += [_pm(100 * r["best_top1"], 100 * r["best_top1_std"], ".2f", "%"),
                      delta_cell(r, "best_top1_delta", "+.2f", 100.0, " pp")]
        rows.append(cells)
        best.append(bool(r["best"]))
    return headers, rows, best


def control_rows(controls: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the NOBLE rows against the controls of their pair."""
    bpb, top1, multi = _has(controls, "final_eval_bpb"), _has(controls, "best_top1"), _multi_setting(controls)
    headers = ["recipe", "variant", "vs control", "n", "reached", "step speedup [95% CI]", "p (speedup)",
               "Δ final loss [95% CI]", "p (Δ)"]
    if multi:
        headers.insert(1, "setting")
        names = setting_names(controls, label="reference")
    if bpb:
        headers += ["Δ bpb [95% CI]"]
    if top1:
        headers += ["Δ top-1 [95% CI]"]
    rows = []
    for _, r in controls.iterrows():
        cells = [str(r["recipe"]), str(r["variant"]), str(r["reference"]), str(r["n"]), str(r["reached"]),
                 speedup_cell(r), _p(r["p_value_speedup"]), delta_cell(r, "final_eval_loss_delta"), _p(r["p_value"])]
        if multi:
            cells.insert(1, _setting(r, names))
        if bpb:
            cells.append(delta_cell(r, "final_eval_bpb_delta"))
        if top1:
            cells.append(delta_cell(r, "best_top1_delta", "+.2f", 100.0, " pp"))
        rows.append(cells)
    return headers, rows


def _diff_cell(r: pd.Series, name: str, fmt: str = "+.4f", scale: float = 1.0, suffix: str = "") -> str:
    if _nan(r[f"{name}_diff"]):
        return "n/a"
    return _ci(scale * r[f"{name}_diff"], scale * r[f"{name}_diff_ci_low"], scale * r[f"{name}_diff_ci_high"], fmt,
               suffix)


def _tidy(v: float) -> float:
    """A mean that is 0 up to rounding error prints as +0.0000, not -0.0000."""
    return 0.0 if abs(v) < 1e-12 else v


def _effect_pair(r: pd.Series, name: str, fmt: str = "+.4f", scale: float = 1.0, suffix: str = "") -> str:
    a, b = r[f"{name}_a"], r[f"{name}_b"]
    return "n/a" if _nan(a) or _nan(b) else f"{_tidy(scale * a):{fmt}}{suffix} / {_tidy(scale * b):{fmt}}{suffix}"


def setting_rows(settings: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of how each setting changes a variant's effect (report/settings.py)."""
    bpb, top1 = settings["bpb_a"].notna().any(), settings["top1_a"].notna().any()
    headers = ["recipe", "settings a / b", "variant", "n", "Δ final loss a / b", "a - b [95% CI]", "p (a - b)"]
    if bpb:
        headers += ["Δ bpb a / b", "a - b (bpb) [95% CI]"]
    if top1:
        headers += ["Δ top-1 a / b", "a - b (top-1) [95% CI]", "p (top-1)"]
    headers += ["step speedup a / b", "a - b (speedup) [95% CI]"]
    rows = []
    for _, r in settings.iterrows():
        budget = "" if _nan(r["max_steps"]) else f"{int(r['max_steps'])} steps: "
        cells = [str(r["recipe"]), f"{budget}{r['setting_a']} / {r['setting_b']}", str(r["variant"]), str(r["n"]),
                 _effect_pair(r, "loss"), _diff_cell(r, "loss"), _p(r["loss_p"])]
        if bpb:
            cells += [_effect_pair(r, "bpb"), _diff_cell(r, "bpb")]
        if top1:
            cells += [_effect_pair(r, "top1", "+.2f", 100.0, " pp"), _diff_cell(r, "top1", "+.2f", 100.0, " pp"),
                      _p(r["top1_p"])]
        speedups = "n/a (not every seed reached)" if _nan(r["speedup_a"]) else \
            f"{r['speedup_a']:.2f}x / {r['speedup_b']:.2f}x"
        cells += [speedups, _diff_cell(r, "speedup", "+.2f", 1.0, "x")]
        rows.append(cells)
    return headers, rows


def _setting_line(r: pd.Series) -> str:
    """'cosnet r8: final eval loss Δ -0.0630 with adamw, +0.0053 with muon; a - b -0.0683 [...] (p = 0.02)'."""
    a, b = r["setting_a"], r["setting_b"]
    text = (f"{r['variant']}: final eval loss Δ {_tidy(r['loss_a']):+.4f} with {a}, "
            f"{_tidy(r['loss_b']):+.4f} with {b}; the difference {_diff_cell(r, 'loss')}")
    if not _nan(r["loss_p"]):
        lo, hi = r["loss_diff_ci_low"], r["loss_diff_ci_high"]
        text += f" (p = {_p(r['loss_p'])}" + (": the 95% CI contains 0)" if lo <= 0.0 <= hi else ")")
    if not _nan(r["top1_diff"]):
        text += (f"; top-1 Δ {_tidy(100 * r['top1_a']):+.2f} pp with {a}, {_tidy(100 * r['top1_b']):+.2f} pp with {b}, "
                 f"difference {_diff_cell(r, 'top1', '+.2f', 100.0, ' pp')} (p = {_p(r['top1_p'])})")
    if not _nan(r["speedup_diff"]):
        text += (f"; step speedup {r['speedup_a']:.2f}x with {a}, {r['speedup_b']:.2f}x with {b}, difference "
                 f"{_diff_cell(r, 'speedup', '+.2f', 1.0, 'x')}")
    return text


def setting_headlines(rep: Report) -> list[tuple[str, list[str]]]:
    """Per recipe, budget and pair of settings: one line per NOBLE variant found under both, saying whether the
    setting changes its effect (the table has the controls too)."""
    out = []
    st = rep.settings
    if st.empty:
        return out
    for (recipe, max_steps, a, b), g in st.groupby(["recipe", "max_steps", "setting_a", "setting_b"], sort=False,
                                                   dropna=False):
        nobles = g[g["role"] == "noble"]
        if nobles.empty:
            continue
        budget = "" if _nan(max_steps) else f" · {int(max_steps)} steps"
        title = f"{recipe}{budget} · {a} vs {b}: does the setting change the branch's effect?"
        out.append((title, [_setting_line(r) for _, r in nobles.iterrows()]))
    return out


# --- headlines -----------------------------------------------------------------------------------------------------
def _figures(r: pd.Series) -> str:
    """'step speedup 1.32x [1.10, 1.54] (5/5 seeds, p = 0.012), final eval loss Δ -0.0410 [...] (p = 0.003)'."""
    sp = speedup_cell(r)
    seeds = f"{r['reached']} seeds reached"
    if r["reached_k"] == r["n"] and not _nan(r["p_value_speedup"]):
        seeds += f", p = {_p(r['p_value_speedup'])}"
        if r["step_speedup_ci_low"] <= 1.0 <= r["step_speedup_ci_high"]:
            seeds += ": the 95% CI contains 1.00x"
    text = f"step speedup {sp} ({seeds}); final eval loss Δ {delta_cell(r, 'final_eval_loss_delta')}"
    if not _nan(r["p_value"]):
        text += f" (p = {_p(r['p_value'])}"
        lo, hi = r["final_eval_loss_delta_ci_low"], r["final_eval_loss_delta_ci_high"]
        text += ": the 95% CI contains 0)" if not _nan(lo) and lo <= 0.0 <= hi else ")"
    if not _nan(r.get("final_eval_bpb_delta", math.nan)):
        text += f"; bpb Δ {delta_cell(r, 'final_eval_bpb_delta')}"
    if r["reference_role"] == "baseline":
        text += f"; wall-clock speedup {wallclock_cell(r)}"
    return text


def _init_of(row) -> float | None:
    scale = row.get("main_init_scale")
    return None if scale is None or pd.isna(scale) else float(scale)


def _control_lines(rep: Report, recipe, pair_key, lead) -> list[str]:
    """`lead` against each of its controls, and a line naming the controls the comparison lacks."""
    lines = []
    ctl = rep.controls
    ctl = ctl[(ctl["recipe"] == recipe) & (ctl["pair_key"] == pair_key)
              & (ctl["variant_key"] == lead["variant_key"])] if not ctl.empty else ctl
    for _, c in ctl.iterrows():
        lines.append(f"vs {CONTROL_ROLES.get(c['reference_role'], 'the control')} {c['reference']}, "
                     f"{lead['variant']}: {_figures(c)}")
    own_init = _init_of(lead) is None
    missing = [name for role, name in CONTROL_ROLES.items() if role not in set(ctl["reference_role"])
               and not (role == "init" and own_init)]  # own init: the baseline is its init control
    if missing:
        lines.append(f"no {' or '.join(m.split('the ', 1)[1] for m in missing)} in this comparison: a speedup "
                     "vs the baseline may be more parameters or the main-weight re-init (add them with "
                     "`--controls dense,init,own-init`, or `noble ablate controls`)")
    return lines


def headlines(rep: Report) -> list[tuple[str, list[str]]]:
    """Per (recipe, pair_key): a title and lines that each say which comparison they are: vs the baseline, vs the
    dense-matched control, vs the init-only control."""
    out = []
    if rep.summary.empty:
        return out
    multi, names = _multi_setting(rep.summary), setting_names(rep.summary)
    for (recipe, pair_key), g in rep.summary.groupby(["recipe", "pair_key"], sort=False):
        base = g[g["is_baseline"].astype(bool)]
        title = str(recipe)
        if not g["max_steps"].isna().all():
            title += f" · {int(g['max_steps'].iloc[0])} steps"
        if not base.empty:
            title += f" · {int(base['n'].iloc[0])} seed(s)"
        if multi:
            title += " · " + names.get((recipe, pair_key), f"pair {str(pair_key)[:8]}")
        lines = []
        variants = g[~g["is_baseline"].astype(bool)]
        best = variants[variants["best"].astype(bool)]
        if not best.empty:
            b = best.iloc[0]
            what = f" (a control: {CONTROL_ROLES[b['role']].split('the ', 1)[1]}, no branch)" \
                if b["role"] in CONTROL_ROLES else ""
            lines.append(f"vs the baseline (target: each seed's baseline best eval loss): best variant "
                         f"{b['variant']}{what}: {_figures(b)}")
        elif variants.empty:
            lines.append("only the baseline so far: no variant of this setting to compare it with")
        else:
            lines.append("vs the baseline: no variant reached the baseline's best eval loss in every seed, so there "
                         "is no best variant (the table gives k/n reached and upper bounds)")
        nobles = variants[variants["role"].isin(["noble"])]
        if nobles.empty:
            out.append((title, lines))
            continue
        lead = best.iloc[0] if not best.empty and best.iloc[0]["role"] == "noble" else nobles.iloc[0]
        if best.empty or best.iloc[0]["role"] != "noble":
            lines.append(f"vs the baseline, {lead['variant']}: {_figures(lead)}")
        lines += _control_lines(rep, recipe, pair_key, lead)
        # The other main-weight init of the same study (the paper's re-init vs the model's own): its leading
        # variant gets its own lines, so the headline never shows one arm of the init comparison alone.
        shown = {_init_of(lead)}
        for _, other in nobles.iterrows():  # best first
            if _init_of(other) not in shown:
                shown.add(_init_of(other))
                lines.append(f"vs the baseline, {other['variant']}: {_figures(other)}")
                lines += _control_lines(rep, recipe, pair_key, other)
        out.append((title, lines))
    return out


# --- terminal ------------------------------------------------------------------------------------------------------
_RIGHT = {"n", "reached", "steps to target", "step speedup [95% CI]", "p (speedup)", "wall-clock speedup", "params",
          "FLOPs/step", "step time", "final eval loss", "Δ final loss [95% CI]", "p (Δ)", "final bpb",
          "Δ bpb [95% CI]", "best top-1", "Δ top-1 [95% CI]"}


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
            f"{r['step_speedup']:.3f}x" if reached else (f"< {bound:.3f}x" if not _nan(bound) else NOT_REACHED),
            (f"{r['wallclock_speedup']:.3f}x" if not _nan(r["wallclock_speedup"]) else "n/a") if reached
            else NOT_REACHED,
            "n/a" if _nan(r["median_step_time_s"]) else f"{r['median_step_time_s']:.4g}",
            "n/a" if _nan(r["step_time_spread"]) else f"±{100 * r['step_time_spread']:.0f}%",
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
  t-test; negative is better. **bpb** (language models that log eval_bpb): the same in bits per byte.
- **n** is the number of seeds, runs paired by seed; report.csv also gives every figure's sample std (`*_std`,
  ddof 1) beside its mean and CI.
- **a - b** (a recipe under several settings, e.g. Mixup/CutMix on and off, AdamW and Muon): a variant's Δ vs its
  own setting's baseline under setting a minus that under setting b, seed by seed, over the seeds both have: mean
  [95% CI] and the paired t-test's p. It tests whether the setting changes the variant's effect (a CI that contains
  0: not shown to); two separate verdicts, one significant and one not, do not show that. The step-speedup
  difference only where every seed reached the target under both.
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

"""What a report cell says, decided once for the terminal and report.md alike:
- a speedup is a mean with its 95% CI only when every seed reached the target; otherwise it is an upper bound
  ("< 0.98x", with "not reached" when no seed did), never the mean of the seeds that happened to reach;
- a step-time or wall-clock figure whose timing noise is larger than the effect reads "noise ±X%";
- FLOPs come from meta.json; older run folders without them show "-".
The table builders here turn the report's frames into (headers, rows of strings).
"""

from __future__ import annotations

import math

import pandas as pd

from noble_cli.report.extras import EXTRAS, Extra
from noble_cli.report.settings import setting_names

NOT_REACHED = "not reached"
MISSING = "-"

def is_nan(v) -> bool:
    try:
        return v is None or math.isnan(float(v))
    except (TypeError, ValueError):
        return False


def fmt_ci(mean: float, low: float, high: float, fmt: str, suffix: str = "") -> str:
    """'1.53x [0.40, 2.66]'; the mean alone where there is no interval (one seed, or no spread)."""
    if is_nan(mean):
        return "n/a"
    s = f"{mean:{fmt}}{suffix}"
    if not is_nan(low) and not is_nan(high):
        s += f" [{low:{fmt}}, {high:{fmt}}]"
    return s


def fmt_pm(mean: float, std: float, fmt: str, suffix: str = "") -> str:
    if is_nan(mean):
        return "n/a"
    s = f"{mean:{fmt}}{suffix}"
    if not is_nan(std):
        s += f" ± {std:{fmt.lstrip('+')}}"
    return s


def fmt_p(p: float) -> str:
    if is_nan(p):
        return ""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def fmt_si(v: float) -> str:
    """1.23e9 -> '1.23G' (FLOPs)."""
    a = abs(v)
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if a >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def per_item(flops_item: str) -> str:
    item = str(flops_item or "item")
    return item[:-1] if item.endswith("s") else item


def p_cell(r: pd.Series, p_col: str = "p_value", q_col: str = "q_value", n_col: str = "n_compared") -> str:
    """'0.042' alone, or '0.042 (q 0.13)' where the comparison tested several variants (see `fdr_adjusted`)."""
    if bool(r["is_baseline"]) or is_nan(r[p_col]):
        return ""
    text = fmt_p(r[p_col])
    if r.get(n_col, 0) >= 2 and not is_nan(r.get(q_col, math.nan)):
        text += f" (q {fmt_p(r[q_col])})"
    return text


def setting_p_cell(r: pd.Series, name: str) -> str:
    """A settings row's p of a - b for `name` (loss, an extra, speedup), with its q where several variants were
    tested between the same two settings: '0.036 (q 0.072)'."""
    p, q, n = r[f"{name}_p"], r.get(f"{name}_q", math.nan), r.get(f"{name}_n_compared", 0)
    if is_nan(p):
        return ""
    return fmt_p(p) + (f" (q {fmt_p(q)})" if n >= 2 and not is_nan(q) else "")


def present_extras(frame: pd.DataFrame) -> list[Extra]:
    """The extras (report/extras.py) some row of `frame` has a value of."""
    return [e for e in EXTRAS if has_column(frame, e.value)]


def extra_delta_cell(r: pd.Series, e: Extra) -> str:
    return delta_cell(r, e.delta, "+" + e.fmt, e.scale, e.delta_unit)


def has_column(summary: pd.DataFrame, col: str) -> bool:
    return col in summary.columns and summary[col].notna().any()


# --- cells ---------------------------------------------------------------------------------------------------------
def speedup_cell(r: pd.Series, col: str = "step_speedup") -> str:
    """Mean [95% CI] when every seed reached the target; an upper bound ("< 0.98x") when some did not."""
    if r["is_baseline"]:
        return "1.00x"
    if r["reached_k"] < r["n"]:
        bound = r[f"{col}_bound"]
        shown = f"< {bound:.2f}x" if not is_nan(bound) else "n/a"
        return f"{NOT_REACHED} ({shown})" if r["reached_k"] == 0 else shown
    return fmt_ci(r[col], r[f"{col}_ci_low"], r[f"{col}_ci_high"], ".2f", "x")


def noise_cell(r: pd.Series) -> str:
    if int(r["n"]) < 2:
        return "n/a (1 seed)"
    return f"noise ±{100 * r['timing_noise']:.0f}%" if not is_nan(r["timing_noise"]) else "noise (CI spans 0)"


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
        return "n/a" if is_nan(ms) else fmt_pm(ms, std, ".3g", " ms")
    if r["timing_noisy"]:
        return noise_cell(r)
    if is_nan(r["step_time_overhead"]):
        return "n/a"
    lo, hi = r["step_time_overhead_ci_low"], r["step_time_overhead_ci_high"]
    s = f"{100 * r['step_time_overhead']:+.1f}%"
    return s + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if not is_nan(lo) else "")


def flops_cell(r: pd.Series) -> str:
    if r["is_baseline"]:
        return MISSING if is_nan(r["flops_per_step"]) else f"{fmt_si(r['flops_per_step'])}/step"
    if is_nan(r["flops_overhead"]):
        return MISSING
    s = f"{100 * r['flops_overhead']:+.1f}%"
    if not is_nan(r["extra_flops_per_item"]):
        sign = "+" if r["extra_flops_per_item"] >= 0 else ""
        s += f" ({sign}{fmt_si(r['extra_flops_per_item'])}/{per_item(r['flops_item'])})"
    return s


def steps_cell(r: pd.Series) -> str:
    if r["reached_k"] < r["n"]:
        return f"> {r['steps_to_target_bound']:.0f}" if not is_nan(r["steps_to_target_bound"]) else NOT_REACHED
    return fmt_ci(r["steps_to_target"], r["steps_to_target_ci_low"], r["steps_to_target_ci_high"], ".0f")


def delta_cell(r: pd.Series, col: str, fmt: str = "+.4f", scale: float = 1.0, suffix: str = "") -> str:
    if r["is_baseline"]:
        return "—"
    return fmt_ci(scale * r[col], scale * r[f"{col}_ci_low"], scale * r[f"{col}_ci_high"], fmt, suffix)


def setting_cell(r: pd.Series, names: dict[tuple, str]) -> str:
    budget = "" if is_nan(r["max_steps"]) else f"{int(r['max_steps'])} steps, "
    return budget + names.get((r["recipe"], r["pair_key"]), f"pair {str(r['pair_key'])[:8]}")


def multi_setting(summary: pd.DataFrame) -> bool:
    return bool(not summary.empty and summary.groupby("recipe")["pair_key"].nunique().gt(1).any())


def display_rows(summary: pd.DataFrame) -> tuple[list[str], list[list[str]], list[bool]]:
    """(headers, rows of strings, is_best per row) of the main table (every row vs its baseline)."""
    extras, multi = present_extras(summary), multi_setting(summary)
    headers = ["recipe", "variant", "n", "reached", "steps to target", "step speedup [95% CI]", "p (speedup)",
               "wall-clock speedup", "params", "FLOPs/step", "step time", "final eval loss",
               "Δ final loss [95% CI]", "p (Δ)"]
    if multi:  # a recipe run under several settings (budget, lr, ...): say which rows belong together
        headers.insert(1, "setting")
        names = setting_names(summary)
    for e in extras:
        headers += [e.label, f"Δ {e.name} [95% CI]"]
    rows, best = [], []
    for _, r in summary.iterrows():
        base = bool(r["is_baseline"])
        cells = [
            str(r["recipe"]), str(r["variant"]), str(r["n"]), str(r["reached"]), steps_cell(r), speedup_cell(r),
            p_cell(r, "p_value_speedup", "q_value_speedup", "n_compared_speedup"), wallclock_cell(r),
            "—" if base else ("n/a" if is_nan(r["param_overhead"]) else f"{100 * r['param_overhead']:+.1f}%"),
            flops_cell(r), step_time_cell(r), fmt_pm(r["final_eval_loss"], r["final_eval_loss_std"], ".4f"),
            delta_cell(r, "final_eval_loss_delta"), p_cell(r),
        ]
        if multi:
            cells.insert(1, setting_cell(r, names))
        for e in extras:
            cells += [fmt_pm(e.scale * r[e.value], e.scale * r[f"{e.value}_std"], e.fmt, e.unit),
                      extra_delta_cell(r, e)]
        rows.append(cells)
        best.append(bool(r["best"]))
    return headers, rows, best


def control_rows(controls: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the NOBLE rows against the controls of their pair."""
    extras, multi = present_extras(controls), multi_setting(controls)
    headers = ["recipe", "variant", "vs control", "n", "reached", "step speedup [95% CI]", "p (speedup)",
               "Δ final loss [95% CI]", "p (Δ)"]
    if multi:
        headers.insert(1, "setting")
        names = setting_names(controls, label="reference")
    headers += [f"Δ {e.name} [95% CI]" for e in extras]
    rows = []
    for _, r in controls.iterrows():
        cells = [str(r["recipe"]), str(r["variant"]), str(r["reference"]), str(r["n"]), str(r["reached"]),
                 speedup_cell(r), p_cell(r, "p_value_speedup", "q_value_speedup", "n_compared_speedup"),
                 delta_cell(r, "final_eval_loss_delta"), p_cell(r)]
        if multi:
            cells.insert(1, setting_cell(r, names))
        cells += [extra_delta_cell(r, e) for e in extras]
        rows.append(cells)
    return headers, rows


def diff_cell(r: pd.Series, name: str, fmt: str = "+.4f", scale: float = 1.0, suffix: str = "") -> str:
    if is_nan(r[f"{name}_diff"]):
        return "n/a"
    return fmt_ci(scale * r[f"{name}_diff"], scale * r[f"{name}_diff_ci_low"], scale * r[f"{name}_diff_ci_high"], fmt,
               suffix)


def tidy(v: float) -> float:
    """A mean that is 0 up to rounding error prints as +0.0000, not -0.0000."""
    return 0.0 if abs(v) < 1e-12 else v


def effect_pair(r: pd.Series, name: str, fmt: str = "+.4f", scale: float = 1.0, suffix: str = "") -> str:
    a, b = r[f"{name}_a"], r[f"{name}_b"]
    return "n/a" if is_nan(a) or is_nan(b) else f"{tidy(scale * a):{fmt}}{suffix} / {tidy(scale * b):{fmt}}{suffix}"


def setting_rows(settings: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of how each setting changes a variant's effect (report/settings.py)."""
    extras = [e for e in EXTRAS if settings[f"{e.key}_a"].notna().any()]
    headers = ["recipe", "settings a / b", "variant", "n", "Δ final loss a / b", "a - b [95% CI]", "p (a - b)"]
    for e in extras:
        headers += [f"Δ {e.name} a / b", f"a - b ({e.name}) [95% CI]", f"p ({e.name})"]
    headers += ["step speedup a / b", "a - b (speedup) [95% CI]"]
    rows = []
    for _, r in settings.iterrows():
        budget = "" if is_nan(r["max_steps"]) else f"{int(r['max_steps'])} steps: "
        cells = [str(r["recipe"]), f"{budget}{r['setting_a']} / {r['setting_b']}", str(r["variant"]), str(r["n"]),
                 effect_pair(r, "loss"), diff_cell(r, "loss"), setting_p_cell(r, "loss")]
        for e in extras:
            cells += [effect_pair(r, e.key, "+" + e.fmt, e.scale, e.delta_unit),
                      diff_cell(r, e.key, "+" + e.fmt, e.scale, e.delta_unit), setting_p_cell(r, e.key)]
        speedups = "n/a (not every seed reached)" if is_nan(r["speedup_a"]) else \
            f"{r['speedup_a']:.2f}x / {r['speedup_b']:.2f}x"
        cells += [speedups, diff_cell(r, "speedup", "+.2f", 1.0, "x")]
        rows.append(cells)
    return headers, rows


def provenance_rows(runs) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): per version of the code (meta.json's git commit and dirty flag), how many runs, on which
    devices, with which library versions, when, and their training time (summary.json's, evaluation excluded)."""
    groups: dict[str, list] = {}
    for r in runs:
        commit = str(r.meta.get("git_commit") or "unknown")
        key = (commit[:10] if commit != "unknown" else "unknown commit") + (" + uncommitted changes"
                                                                          if r.meta.get("git_dirty") else "")
        groups.setdefault(key, []).append(r)
    rows = []
    for version, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        versions = sorted({", ".join(f"{k} {str(v).split('+')[0]}" for k, v in (r.meta.get("versions") or {}).items()
                                     if k in ("python", "torch", "lightning")) for r in rs} - {""})
        devices = sorted({str(r.meta.get("device") or "?") for r in rs})
        dates = sorted(str(r.created_at)[:10] for r in rs if r.created_at)
        seconds = sum(float(r.summary.get("train_time_s") or 0.0) for r in rs)
        rows.append([version, str(len(rs)), "; ".join(devices), "; ".join(versions) or "?",
                     f"{dates[0]} to {dates[-1]}" if dates and dates[0] != dates[-1] else (dates[0] if dates else "?"),
                     f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"])
    return ["code", "runs", "device", "versions", "created", "training time"], rows

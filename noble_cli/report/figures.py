"""The figures a report computes (definitions in /work/shared/NOBLE.md, "The figures a report must compute").

Per run (paired with the baseline of the same pair_key and seed):
- target            = the baseline's best eval loss (min over its eval points)
- steps_to_target   = first step where the run's eval loss <= target, linearly interpolated between the eval point
                      before it and that one; if the very first eval point is already <= target, that point's step
                      (no earlier point to interpolate from: a conservative upper bound). NaN = not reached.
- step_speedup      = baseline's best step (step of its min eval loss, first if tied) / steps_to_target
- param_overhead    = params_total / baseline params_total - 1
- step_time_overhead= median step time / baseline median step time - 1
- wallclock_speedup = baseline wallclock_s at its best step / run's wallclock_s at steps_to_target (interpolated)
- final_eval_loss   = last eval point; final_eval_loss_delta = run - baseline (negative = better)
- best_top1         = max eval_top1 (classification); best_top1_delta = run - baseline

Across seeds (one row per (recipe, pair_key, variant_key)): mean and sample std (ddof=1; NaN for n=1). Speedups,
steps-to-target and wall-clock speedups average over the seeds that reached the target only ("reached" = k/n).
p_value: two-sided paired t-test on the final eval loss deltas vs the baseline (n >= 2);
p_value_speedup: two-sided one-sample t-test of the step speedups (reached seeds, k >= 2) against 1.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from noble_cli.report.runs import Run
from noble_cli.report.stats import one_sample_t_test


def best_point(evals: pd.DataFrame) -> tuple[float, float]:
    """(best eval loss, step of it); the first step when tied."""
    i = int(np.argmin(evals["eval_loss"].to_numpy(float)))
    return float(evals["eval_loss"].iloc[i]), float(evals["step"].iloc[i])


def steps_to_target(evals: pd.DataFrame, target: float) -> float:
    """First (interpolated) step where eval loss <= target; NaN if never."""
    steps = evals["step"].to_numpy(float)
    losses = evals["eval_loss"].to_numpy(float)
    hits = np.nonzero(losses <= target)[0]
    if hits.size == 0:
        return math.nan
    i = int(hits[0])
    if i == 0:
        return float(steps[0])
    s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
    # l0 > target >= l1, so l0 - l1 > 0.
    return float(s0 + (s1 - s0) * (l0 - target) / (l0 - l1))


def _ratio(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


RUN_COLUMNS = [
    "recipe", "task", "variant", "seed", "is_baseline", "status", "run_id", "max_steps", "params_total",
    "params_branch", "target", "baseline_best_step", "steps_to_target", "reached", "step_speedup",
    "param_overhead", "median_step_time_s", "step_time_overhead", "baseline_wallclock_to_best_s",
    "wallclock_to_target_s", "wallclock_speedup", "best_eval_loss", "final_eval_loss", "final_eval_loss_delta",
    "best_top1", "best_top1_delta", "baseline_run_id", "variant_key", "pair_key", "path",
]


def run_figures(run: Run, base: Run) -> dict:
    """The per-run figures of `run` against its baseline `base` (which may be `run` itself)."""
    target, base_best_step = best_point(base.evals)
    own_best, _ = best_point(run.evals)
    stt = steps_to_target(run.evals, target)
    reached = not math.isnan(stt)
    base_wc_best = base.wallclock_at(base_best_step)
    wc_to_target = run.wallclock_at(stt) if reached else math.nan
    final = float(run.evals["eval_loss"].iloc[-1])
    base_final = float(base.evals["eval_loss"].iloc[-1])

    def top1(r: Run) -> float:
        if r.has_top1:
            return float(r.evals["eval_top1"].max())
        v = r.summary.get("best_eval_top1")
        try:
            return float(v) if v is not None else math.nan
        except (TypeError, ValueError):
            return math.nan

    best_top1, base_top1 = top1(run), top1(base)
    return {
        "recipe": run.recipe,
        "task": run.task,
        "variant": run.variant,
        "seed": run.seed,
        "is_baseline": run.is_baseline,
        "status": run.status,
        "run_id": run.run_id,
        "max_steps": run.max_steps,
        "params_total": run.params_total,
        "params_branch": run.params_branch,
        "target": target,
        "baseline_best_step": base_best_step,
        "steps_to_target": stt,
        "reached": reached,
        "step_speedup": _ratio(base_best_step, stt) if reached else math.nan,
        "param_overhead": _ratio(run.params_total, base.params_total) - 1,
        "median_step_time_s": run.median_step_time_s,
        "step_time_overhead": _ratio(run.median_step_time_s, base.median_step_time_s) - 1,
        "baseline_wallclock_to_best_s": base_wc_best,
        "wallclock_to_target_s": wc_to_target,
        "wallclock_speedup": _ratio(base_wc_best, wc_to_target) if reached else math.nan,
        "best_eval_loss": own_best,
        "final_eval_loss": final,
        "final_eval_loss_delta": final - base_final,
        "best_top1": best_top1,
        "best_top1_delta": best_top1 - base_top1,
        "baseline_run_id": base.run_id,
        "variant_key": run.variant_key,
        "pair_key": run.pair_key,
        "path": str(run.path),
    }


def pair_runs(runs: list[Run]) -> tuple[pd.DataFrame, list[tuple]]:
    """Per-run figures for every run that has a baseline of the same pair_key and seed.

    Returns (runs_table, skipped) where skipped lists (path, reason) for variants without a baseline.
    """
    baselines = {(r.recipe, r.pair_key, str(r.seed)): r for r in runs if r.is_baseline}
    rows, skipped = [], []
    for r in runs:
        base = r if r.is_baseline else baselines.get((r.recipe, r.pair_key, str(r.seed)))
        if base is None:
            skipped.append((r.path, f"no baseline run with pair_key {r.pair_key} and seed {r.seed} "
                                    f"(recipe {r.recipe}) to compare with"))
            continue
        rows.append(run_figures(r, base))
    return pd.DataFrame(rows, columns=RUN_COLUMNS), skipped


SUMMARY_COLUMNS = [
    "recipe", "task", "variant", "is_baseline", "best", "max_steps", "n", "seeds", "reached", "reached_k",
    "target", "target_std", "steps_to_target", "steps_to_target_std", "step_speedup", "step_speedup_std",
    "p_value_speedup", "param_overhead", "params_total", "step_time_overhead", "step_time_overhead_std",
    "wallclock_speedup", "wallclock_speedup_std", "final_eval_loss", "final_eval_loss_std",
    "final_eval_loss_delta", "final_eval_loss_delta_std", "p_value", "best_top1", "best_top1_std",
    "best_top1_delta", "best_top1_delta_std", "statuses", "variant_key", "pair_key",
]


def _mean_std(s: pd.Series) -> tuple[float, float]:
    s = pd.to_numeric(s, errors="coerce").dropna()
    if s.empty:
        return math.nan, math.nan
    return float(s.mean()), float(s.std(ddof=1)) if len(s) >= 2 else math.nan


def _seed_sort_key(seed) -> tuple:
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def summarize(runs_table: pd.DataFrame) -> pd.DataFrame:
    """One row per (recipe, pair_key, variant_key): mean/std over seeds, k/n reached, p-values, the best variant.

    Rows are ordered by recipe and pair_key, the baseline first, then variants by step speedup (not reached last).
    `best` marks, per (recipe, pair_key), the variant with the highest mean step speedup among those that reached
    the target in every seed (or, if none did, among those that reached it in some seed); ties go to the higher
    wall-clock speedup.
    """
    if runs_table.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = []
    for (recipe, pair_key, variant_key), g in runs_table.groupby(["recipe", "pair_key", "variant_key"], sort=False):
        n = len(g)
        reached = g[g["reached"].astype(bool)]
        k = len(reached)
        row = {
            "recipe": recipe,
            "task": g["task"].iloc[0],
            "variant": g["variant"].iloc[0],
            "is_baseline": bool(g["is_baseline"].iloc[0]),
            "best": False,
            "max_steps": g["max_steps"].iloc[0],
            "n": n,
            "seeds": ",".join(str(s) for s in sorted(g["seed"], key=_seed_sort_key)),
            "reached": f"{k}/{n}",
            "reached_k": k,
            "params_total": g["params_total"].iloc[0],
            "statuses": ",".join(sorted(set(g["status"]))),
            "variant_key": variant_key,
            "pair_key": pair_key,
        }
        row["target"], row["target_std"] = _mean_std(g["target"])
        for col in ("steps_to_target", "step_speedup", "wallclock_speedup"):
            row[col], row[f"{col}_std"] = _mean_std(reached[col])
        for col in ("step_time_overhead", "final_eval_loss", "final_eval_loss_delta", "best_top1",
                    "best_top1_delta"):
            row[col], row[f"{col}_std"] = _mean_std(g[col])
        row["param_overhead"], _ = _mean_std(g["param_overhead"])
        if row["is_baseline"]:
            row["p_value"] = row["p_value_speedup"] = math.nan
        else:
            row["p_value"] = one_sample_t_test(g["final_eval_loss_delta"].tolist())[1]
            row["p_value_speedup"] = one_sample_t_test(reached["step_speedup"].tolist(), 1.0)[1]
        rows.append(row)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    # The best variant per (recipe, pair_key).
    for _, g in out[~out["is_baseline"]].groupby(["recipe", "pair_key"], sort=False):
        cand = g[g["step_speedup"].notna()]
        full = cand[cand["reached_k"] == cand["n"]]
        cand = full if not full.empty else cand
        if cand.empty:
            continue
        ws = cand["wallclock_speedup"].fillna(-math.inf)
        best = cand.assign(_ws=ws).sort_values(["step_speedup", "_ws"], ascending=False).index[0]
        out.loc[best, "best"] = True

    out = out.assign(_base=~out["is_baseline"], _sp=out["step_speedup"].fillna(-math.inf))
    out = out.sort_values(["recipe", "pair_key", "_base", "_sp", "variant"],
                          ascending=[True, True, True, False, True], kind="stable")
    return out.drop(columns=["_base", "_sp"]).reset_index(drop=True)

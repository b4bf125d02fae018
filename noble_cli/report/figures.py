"""The figures a report computes (definitions in docs/run-folder.md, "How `noble report` reads a results tree").

"Eval loss" below is the run's metric (its task's, recorded in meta.json; eval_loss, lower is better, for every
task today); a metric where higher is better is compared through its score (its negative), and its deltas are then
positive where better.

Per run, against a reference run of the same recipe, pair_key and seed (its baseline; or, in the comparisons with
the controls, the dense-matched or init-only control of that seed):
- target            = the reference's best eval loss (min over its eval points)
- steps_to_target   = first step where the run's eval loss <= target, linearly interpolated between the eval point
                      before it and that one; if the very first eval point is already <= target, that point's step
                      (no earlier point to interpolate from: a conservative upper bound). NaN = not reached.
- step_speedup      = reference's best step (step of its min eval loss, first if tied) / steps_to_target.
                      Not reached: step_speedup_bound = reference's best step / the run's budget (max_steps), an
                      upper bound (it would have reached after its budget, if ever)
- param_overhead    = params_total / reference params_total - 1
- flops_overhead    = flops_per_step / reference flops_per_step - 1 (meta.json; NaN for older folders), and the
                      extra FLOPs per step and per item (token, image)
- step_time_overhead= median step time / reference median step time - 1; step_time_spread = the run's
                      relative std of step time (IQR / 1.349 / median)
- wallclock_speedup = reference wallclock_s at its best step / run's wallclock_s at steps_to_target (interpolated);
                      not reached: wallclock_speedup_bound = reference wallclock at its best / the run's total
- final_eval_loss   = last eval point; final_eval_loss_delta = run - reference (negative = better)
- the extras (report/extras.py: final_eval_bpb, best_top1, best_acc, best_psnr where a run logs them): the value,
  the reference's, and the delta run - reference

Across seeds (one row per (recipe, pair_key, [reference,] variant_key)), see `summarize`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from noble_cli.report.extras import EXTRAS, Extra
from noble_cli.report.runs import Run
from noble_cli.report.stats import Estimate, estimate, fdr_adjusted, paired
from noble_cli.roles import CONTROL_ROLES


def best_point(evals: pd.DataFrame) -> tuple[float, float]:
    """(best score, step of it); the first step when tied. A score is the run's metric with lower = better."""
    i = int(np.argmin(evals["score"].to_numpy(float)))
    return float(evals["score"].iloc[i]), float(evals["step"].iloc[i])


def steps_to_target(evals: pd.DataFrame, target: float) -> float:
    """First (interpolated) step where the score is <= the target score; NaN if never."""
    steps = evals["step"].to_numpy(float)
    losses = evals["score"].to_numpy(float)
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


def _metric(r: Run, col: str, how: str) -> float:
    if col not in r.evals.columns or not r.evals[col].notna().any():
        return math.nan
    s = r.evals[col].dropna()
    return float(s.iloc[-1] if how == "last" else s.min() if how == "min" else s.max())


RUN_COLUMNS = [
    "recipe", "task", "variant", "role", "seed", "is_baseline", "status", "run_id", "max_steps", "budget",
    "params_total",
    "params_branch", "target", "baseline_best_step", "steps_to_target", "reached", "step_speedup",
    "step_speedup_bound", "param_overhead", "flops_per_step", "flops_per_item", "flops_item", "flops_overhead",
    "extra_flops_per_step", "extra_flops_per_item", "median_step_time_s", "baseline_median_step_time_s",
    "step_time_overhead", "step_time_spread", "baseline_step_time_spread", "baseline_wallclock_to_best_s",
    "wallclock_to_target_s", "wallclock_speedup", "wallclock_speedup_bound", "best_eval_loss", "final_eval_loss",
    "baseline_final_eval_loss", "final_eval_loss_delta", "best_eval_bpb",
    *[c for e in EXTRAS for c in (e.value, f"baseline_{e.value}", e.delta)],
    "baseline_run_id", "reference", "reference_role", "reference_key", "variant_key", "pair_key", "main_init_scale",
    "path",
]


def run_figures(run: Run, base: Run) -> dict:
    """The per-run figures of `run` against its reference `base` (its baseline, a control, or itself)."""
    target_score, base_best_step = best_point(base.evals)
    target = base.metric.as_lower_is_better(target_score)  # back in the metric's own units
    own_best = run.metric.as_lower_is_better(best_point(run.evals)[0])
    stt = steps_to_target(run.evals, target_score)
    reached = not math.isnan(stt)
    base_wc_best = base.wallclock_at(base_best_step)
    wc_to_target = run.wallclock_at(stt) if reached else math.nan
    final = float(run.evals["metric"].iloc[-1])
    base_final = float(base.evals["metric"].iloc[-1])

    speedup = _ratio(base_best_step, stt) if reached else math.nan
    wc_speedup = _ratio(base_wc_best, wc_to_target) if reached else math.nan
    extra_flops = run.flops_per_step - base.flops_per_step
    return {
        "recipe": run.recipe,
        "task": run.task,
        "variant": run.variant,
        "role": run.role,
        "seed": run.seed,
        "is_baseline": run.is_baseline,
        "status": run.status,
        "run_id": run.run_id,
        "max_steps": run.max_steps,
        "budget": run.budget,
        "params_total": run.params_total,
        "params_branch": run.params_branch,
        "target": target,
        "baseline_best_step": base_best_step,
        "steps_to_target": stt,
        "reached": reached,
        "step_speedup": speedup,
        # a run that never reached would have needed more than its budget: its speedup is below this
        "step_speedup_bound": speedup if reached else _ratio(base_best_step, run.budget),
        "param_overhead": _ratio(run.params_total, base.params_total) - 1,
        "flops_per_step": run.flops_per_step,
        "flops_per_item": run.flops_per_item,
        "flops_item": run.flops_item,
        "flops_overhead": _ratio(run.flops_per_step, base.flops_per_step) - 1,
        "extra_flops_per_step": extra_flops,
        # per item of the run's own batch (the same batch as its reference's: same pair key)
        "extra_flops_per_item": _ratio(extra_flops * run.flops_per_item, run.flops_per_step),
        "median_step_time_s": run.median_step_time_s,
        "baseline_median_step_time_s": base.median_step_time_s,
        "step_time_overhead": _ratio(run.median_step_time_s, base.median_step_time_s) - 1,
        "step_time_spread": run.step_time_spread,
        "baseline_step_time_spread": base.step_time_spread,
        "baseline_wallclock_to_best_s": base_wc_best,
        "wallclock_to_target_s": wc_to_target,
        "wallclock_speedup": wc_speedup,
        "wallclock_speedup_bound": wc_speedup if reached else _ratio(base_wc_best, run.final_wallclock_s),
        "best_eval_loss": own_best,
        "final_eval_loss": final,
        "baseline_final_eval_loss": base_final,
        "final_eval_loss_delta": final - base_final,
        "best_eval_bpb": _metric(run, "eval_bpb", "min"),
        **extra_figures(run, base),
        "baseline_run_id": base.run_id,
        "reference": base.variant,
        "reference_role": base.role,
        "reference_key": base.variant_key,
        "variant_key": run.variant_key,
        "pair_key": run.pair_key,
        "main_init_scale": main_init_scale(run),
        "path": str(run.path),
    }


def _extra_value(run: Run, e: Extra) -> float:
    v = _metric(run, e.column, e.how)
    if math.isnan(v) and e.summary_key:
        try:
            v = float(run.summary.get(e.summary_key))
        except (TypeError, ValueError):
            v = math.nan
    return v


def extra_figures(run: Run, base: Run) -> dict:
    """Each extra's value for the run and its reference, and their difference (NaN where not logged)."""
    out = {}
    for e in EXTRAS:
        v, b = _extra_value(run, e), _extra_value(base, e)
        out.update({e.value: v, f"baseline_{e.value}": b, e.delta: v - b})
    return out


def main_init_scale(run: Run) -> float | None:
    """The main-weight re-init a run applied to its targeted layers (noble.main_init_scale, 0.5 by default in
    folders that predate the field); None: the model's own init. Meaningful for NOBLE runs and init-only controls."""
    noble = (run.config or {}).get("noble") or {}
    return noble.get("main_init_scale", 0.5)


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


def control_runs(runs: list[Run]) -> pd.DataFrame:
    """Every NOBLE run (role noble) against each control (dense-matched, init-only) of its recipe, pair_key and
    seed: the same figures, with the control in the baseline's place (its best eval loss is the target). An
    init-only control stands in for NOBLE runs with its own main-weight re-init only: for a run that keeps the
    model's init (own-init) the baseline itself is that control, and the init-only run differs from it in init
    as well as branch, so they are not paired."""
    controls: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.role in CONTROL_ROLES:
            controls.setdefault((r.recipe, r.pair_key, str(r.seed)), []).append(r)
    rows = [run_figures(r, c) for r in runs if r.role == "noble"
            for c in controls.get((r.recipe, r.pair_key, str(r.seed)), [])
            if c.role != "init" or main_init_scale(c) == main_init_scale(r)]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


SUMMARY_COLUMNS = [
    "recipe", "task", "variant", "role", "is_baseline", "best", "max_steps", "n", "seeds", "reached", "reached_k",
    "censored", "target", "target_std",
    "steps_to_target", "steps_to_target_std", "steps_to_target_ci_low", "steps_to_target_ci_high",
    "steps_to_target_bound",
    "step_speedup", "step_speedup_std", "step_speedup_ci_low", "step_speedup_ci_high", "p_value_speedup",
    "q_value_speedup", "n_compared_speedup",
    "step_speedup_bound",
    "param_overhead", "params_total",
    "flops_per_step", "flops_overhead", "extra_flops_per_step", "extra_flops_per_item", "flops_item",
    "median_step_time_s", "median_step_time_s_std", "step_time_overhead", "step_time_overhead_std",
    "step_time_overhead_ci_low", "step_time_overhead_ci_high", "timing_noise", "timing_noisy",
    "wallclock_speedup", "wallclock_speedup_std", "wallclock_speedup_ci_low", "wallclock_speedup_ci_high",
    "wallclock_speedup_bound",
    "final_eval_loss", "final_eval_loss_std", "final_eval_loss_delta", "final_eval_loss_delta_std",
    "final_eval_loss_delta_ci_low", "final_eval_loss_delta_ci_high", "p_value", "q_value", "n_compared",
    "best_eval_bpb",
    *[c for e in EXTRAS for c in (e.value, f"{e.value}_std", e.delta, f"{e.delta}_std", f"{e.delta}_ci_low",
                                   f"{e.delta}_ci_high", f"p_value_{e.key}")],
    "statuses", "reference", "reference_role", "reference_key", "variant_key", "pair_key", "main_init_scale",
]


def _seed_sort_key(seed) -> tuple:
    try:
        return (0, float(seed), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(seed))


def _put(row: dict, col: str, e: Estimate, ci: bool = True) -> None:
    row[col], row[f"{col}_std"] = e.mean, e.std
    if ci:
        row[f"{col}_ci_low"], row[f"{col}_ci_high"] = e.low, e.high


def _nanmean(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    return float(s.mean()) if not s.empty else math.nan


def timing_noise(g: pd.DataFrame) -> float:
    """How much step time moves by itself, relative: the larger of the spread of the reference's median step time
    across seeds (std / mean; two seeds or more) and the typical (median) within-run spread (relative std) of these
    runs and their references. NaN when neither can be measured."""
    base = pd.to_numeric(g.drop_duplicates("baseline_run_id")["baseline_median_step_time_s"], errors="coerce").dropna()
    between = float(base.std(ddof=1) / base.mean()) if len(base) >= 2 and base.mean() > 0 else math.nan
    refs = g.drop_duplicates("baseline_run_id")
    within_runs = pd.concat([g["step_time_spread"], refs["baseline_step_time_spread"]])
    within_runs = pd.to_numeric(within_runs, errors="coerce").dropna()
    within = float(within_runs.median()) if not within_runs.empty else math.nan
    both = [v for v in (between, within) if not math.isnan(v)]
    return max(both) if both else math.nan


def _adjust_for_multiple_variants(out: pd.DataFrame, family: list[str]) -> None:
    """q_value (q_value_speedup): the Benjamini-Hochberg adjustment of p_value (p_value_speedup) over the variants of
    one comparison (`family`: the same recipe, pair key and reference), and n_compared (_speedup), how many p-values
    the family has. Baselines: NaN."""
    for p_col, q_col, n_col in (("p_value", "q_value", "n_compared"),
                                ("p_value_speedup", "q_value_speedup", "n_compared_speedup")):
        out[q_col], out[n_col] = math.nan, 0
        for _, g in out[~out["is_baseline"].astype(bool)].groupby(family, sort=False):
            out.loc[g.index, q_col] = fdr_adjusted(g[p_col])
            out.loc[g.index, n_col] = int(g[p_col].notna().sum())


def summarize(runs_table: pd.DataFrame, by_reference: bool = False) -> pd.DataFrame:
    """One row per (recipe, pair_key, variant_key) — per reference too with `by_reference` — over seeds:

    - seeds that all reached the target: steps, step and wall-clock speedup as mean, sample std (ddof 1) and 95% t
      interval; p_value_speedup = two-sided one-sample t-test of the speedups against 1;
    - some seed did not reach it (`censored`): no mean over the seeds that did (that mean would favour the variant).
      Instead `*_bound`: the mean over all seeds with each missing speedup replaced by its upper bound (reference's
      best step / budget; for steps to target the budget, a lower bound): the true mean is below (above) it;
    - final eval loss (and each extra's) delta: mean, std, 95% CI and the paired t-test's p (p_value), all seeds;
    - q_value, q_value_speedup: p adjusted for the number of variants compared (`_adjust_for_multiple_variants`);
    - step-time overhead: mean, std, 95% CI; `timing_noise` (see `timing_noise`) and `timing_noisy`: the noise is
      larger than the overhead, or its CI contains 0, or there is one seed (no CI): a wall-clock figure would be
      noise, not a speedup.

    Rows are ordered by recipe and pair_key (and reference), the baseline first, then the variants that reached
    in every seed by step speedup, then the others by their bound. `best` marks, per (recipe, pair_key), the
    highest mean step speedup among the variants that reached the target in every seed (ties: the higher
    wall-clock speedup); a censored variant is never the best, and there may be none.
    """
    if runs_table.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    keys = ["recipe", "pair_key"] + (["reference_key"] if by_reference else []) + ["variant_key"]
    rows = []
    for _, g in runs_table.groupby(keys, sort=False):
        g = g.sort_values("seed", key=lambda s: s.map(_seed_sort_key))
        n = len(g)
        reached = g["reached"].astype(bool)
        k = int(reached.sum())
        first = g.iloc[0]
        row = {c: first[c] for c in ("recipe", "task", "variant", "role", "max_steps", "params_total",
                                     "reference", "reference_role", "reference_key", "variant_key", "pair_key",
                                     "main_init_scale")}
        row.update({
            "is_baseline": bool(first["is_baseline"]), "best": False, "n": n,
            "seeds": ",".join(str(s) for s in g["seed"]), "reached": f"{k}/{n}", "reached_k": k,
            "censored": k < n, "statuses": ",".join(sorted(set(g["status"]))),
            "flops_item": next((x for x in g["flops_item"] if isinstance(x, str) and x), ""),
        })
        t = estimate(g["target"])
        row["target"], row["target_std"] = t.mean, t.std
        if k == n:
            _put(row, "steps_to_target", estimate(g["steps_to_target"]))
            sp = estimate(g["step_speedup"], 1.0)
            _put(row, "step_speedup", sp)
            row["p_value_speedup"] = sp.p
            _put(row, "wallclock_speedup", estimate(g["wallclock_speedup"], 1.0))
        else:
            # a seed that never reached would have needed more steps than its budget: the true mean is above this
            row["steps_to_target_bound"] = float(np.mean(np.where(reached, g["steps_to_target"], g["budget"])))
            row["step_speedup_bound"] = _nanmean(g["step_speedup_bound"])
            row["wallclock_speedup_bound"] = (_nanmean(g["wallclock_speedup_bound"])
                                              if g["wallclock_speedup_bound"].notna().all() else math.nan)
        row["param_overhead"] = _nanmean(g["param_overhead"])
        for col in ("flops_per_step", "flops_overhead", "extra_flops_per_step", "extra_flops_per_item"):
            row[col] = _nanmean(g[col])
        m = estimate(g["median_step_time_s"])
        row["median_step_time_s"], row["median_step_time_s_std"] = m.mean, m.std
        ov = estimate(g["step_time_overhead"])
        _put(row, "step_time_overhead", ov)
        noise = timing_noise(g)
        row["timing_noise"] = noise
        # One pair of runs cannot tell the branch's cost from a change of load between the two runs: a timing needs
        # two seeds or more (an overhead with a CI), and a CI that excludes 0 and the noise.
        row["timing_noisy"] = bool(not row["is_baseline"] and (
            (not math.isnan(noise) and not math.isnan(ov.mean) and noise > abs(ov.mean)) or ov.contains(0.0)
            or ov.n == 1))
        fl = estimate(g["final_eval_loss"])
        row["final_eval_loss"], row["final_eval_loss_std"] = fl.mean, fl.std
        d = paired(g["final_eval_loss"], g["baseline_final_eval_loss"])
        _put(row, "final_eval_loss_delta", d)
        row["p_value"] = d.p
        row["best_eval_bpb"] = _nanmean(g["best_eval_bpb"])
        for e in EXTRAS:
            v = estimate(g[e.value])
            row[e.value], row[f"{e.value}_std"] = v.mean, v.std
            d = paired(g[e.value], g[f"baseline_{e.value}"])
            _put(row, e.delta, d)
            row[f"p_value_{e.key}"] = d.p
        if row["is_baseline"]:
            for col in ("p_value", "p_value_speedup", *(f"p_value_{e.key}" for e in EXTRAS)):
                row[col] = math.nan
        rows.append(row)
    out = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    _adjust_for_multiple_variants(out, ["recipe", "pair_key"] + (["reference_key"] if by_reference else []))

    if not by_reference:  # the best variant per (recipe, pair_key): every seed reached, highest mean speedup
        for _, g in out[~out["is_baseline"].astype(bool)].groupby(["recipe", "pair_key"], sort=False):
            cand = g[(g["reached_k"] == g["n"]) & g["step_speedup"].notna()]
            if cand.empty:
                continue
            ws = cand["wallclock_speedup"].fillna(-math.inf)
            best = cand.assign(_ws=ws).sort_values(["step_speedup", "_ws"], ascending=False).index[0]
            out.loc[best, "best"] = True

    full = out["reached_k"] == out["n"]
    out = out.assign(_base=~out["is_baseline"].astype(bool), _part=~full,
                     _sp=np.where(full, out["step_speedup"], out["step_speedup_bound"]))
    out["_sp"] = out["_sp"].fillna(-math.inf)
    order = ["recipe", "pair_key"] + (["reference"] if by_reference else []) + ["_base", "_part", "_sp", "variant"]
    asc = [True, True] + ([True] if by_reference else []) + [True, True, False, True]
    out = out.sort_values(order, ascending=asc, kind="stable")
    return out.drop(columns=["_base", "_part", "_sp"]).reset_index(drop=True)

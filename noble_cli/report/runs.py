"""Loading run folders robustly (the contract is in docs/run-folder.md).

`load_runs(root)` finds every run folder under `root` (any depth), loads the usable ones into `Run` objects and
returns the others as `(path, reason)` pairs. Nothing in here raises for a bad run folder: a report over a results
tree that holds a crashed, running or half-copied run must still be produced.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from noble_cli.report.extras import EXTRAS
from noble_cli.roles import role_of_saved
from noble_cli.tasks.spec import Metric
from noble_cli.train.run_folder import FINISHED, STATUSES

# Statuses whose curves are final. A diverged run is a legitimate outcome (it usually "does not reach"), so it is
# kept and flagged; running, interrupted and failed runs are partial and skipped.

REQUIRED_META = ("recipe", "variant_key", "pair_key", "seed", "is_baseline")

# Fraction of the logged step times treated as warm-up when summary.json lacks median_step_time_s.
WARMUP_FRACTION = 0.1


class SkipRun(Exception):
    """A run folder that cannot be used; the message is the reason shown in the report."""


@dataclass
class Run:
    path: Path
    run_id: str
    recipe: str
    task: str
    variant: str
    variant_key: str
    pair_key: str
    seed: Any
    is_baseline: bool
    status: str
    max_steps: float
    params_total: float
    params_branch: float
    created_at: str
    median_step_time_s: float
    # step, metric (the task's, meta.json: eval_loss for every task today), score (the metric with lower = better),
    # wallclock_s (interpolated where missing), the extras' columns (report/extras.py) where logged
    evals: pd.DataFrame
    wallclock: pd.DataFrame  # step, wallclock_s over every row that has both; sorted, for interpolation
    meta: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    config: dict | None = None
    metric: Metric = field(default_factory=Metric)
    role: str = "noble"  # baseline | noble | dense (dense-matched control) | init (init-only control)
    step_time_spread: float = math.nan  # within-run relative std of step_time_s (robust: IQR-based), warm-up out
    flops_per_step: float = math.nan  # meta.json (runs from before it was recorded: NaN)
    flops_per_item: float = math.nan
    flops_item: str = ""  # what an item is: tokens, images


    @property
    def budget(self) -> float:
        """The step budget (meta's max_steps), else the last eval step: a run not at the target by then never
        reached it within its budget."""
        last = float(self.evals["step"].iloc[-1])
        return self.max_steps if not math.isnan(self.max_steps) and self.max_steps > 0 else last

    @property
    def final_wallclock_s(self) -> float:
        """Training time at the last logged step (NaN if none)."""
        return float(self.wallclock["wallclock_s"].iloc[-1]) if not self.wallclock.empty else math.nan

    def wallclock_at(self, step: float) -> float:
        """Cumulative training time at a (possibly fractional) step, linearly interpolated; NaN if unknown."""
        wc = self.wallclock
        if wc.empty or step is None or math.isnan(step):
            return math.nan
        steps, secs = wc["step"].to_numpy(float), wc["wallclock_s"].to_numpy(float)
        if step < steps[0]:
            # Before the first logged step: interpolate from (0, 0), the start of training.
            return float(np.interp(step, [0.0, steps[0]], [0.0, secs[0]])) if steps[0] > 0 else float(secs[0])
        if step > steps[-1]:
            return math.nan
        return float(np.interp(step, steps, secs))


def find_run_dirs(root: Path, exclude: Path | None = None) -> list[Path]:
    """Every folder under `root` (itself included) that looks like a run folder.

    A run folder is one holding meta.json; a folder holding metrics.csv or summary.json but no meta.json is also
    returned (it is then skipped as "missing meta.json" rather than silently ignored). `exclude` (the report's own
    output folder) is not searched.
    """
    root = Path(root)
    exclude_resolved = Path(exclude).resolve() if exclude is not None else None
    if exclude_resolved == root.resolve():  # `noble report R --out R`: the report's files sit among the runs
        exclude_resolved = None
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if exclude_resolved is not None and d.resolve() == exclude_resolved:
            dirnames[:] = []
            continue
        dirnames.sort()
        if any(name in filenames for name in ("meta.json", "metrics.csv", "summary.json")):
            found.append(d)
    return sorted(found)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SkipRun(f"missing {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkipRun(f"corrupt {what}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise SkipRun(f"unreadable {what}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise SkipRun(f"corrupt {what}: expected a JSON object, got {type(data).__name__}")
    return data


def _as_bool(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v)


def _as_float(v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def read_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv merged by step: one row per step, each column's first non-empty value; sorted by step.

    Every column is coerced to numbers (unparsable cells become NaN); non-finite values (inf) become NaN too.
    """
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise SkipRun("missing metrics.csv") from None
    except pd.errors.EmptyDataError:
        raise SkipRun("metrics.csv is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise SkipRun(f"unparsable metrics.csv: {str(e).splitlines()[0]}") from None
    df.columns = [str(c).strip() for c in df.columns]
    if "step" not in df.columns:
        raise SkipRun(f"metrics.csv has no 'step' column (columns: {', '.join(df.columns) or 'none'})")
    df = df.apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan)
    df = df[df["step"].notna()]
    if df.empty:
        raise SkipRun("metrics.csv has no rows with a step")
    return df.groupby("step", sort=True, as_index=False).first()


def _step_times(metrics: pd.DataFrame) -> pd.Series:
    """The logged step times, the first WARMUP_FRACTION of them (compilation, caches) dropped."""
    if "step_time_s" not in metrics.columns:
        return pd.Series(dtype=float)
    st = metrics["step_time_s"].dropna()
    st = st[st > 0]
    warm = int(math.ceil(WARMUP_FRACTION * len(st))) if len(st) >= 2 else 0
    return st.iloc[warm:].astype(float)


def _median_step_time(summary: dict, metrics: pd.DataFrame) -> float:
    v = _as_float(summary.get("median_step_time_s"))
    if not math.isnan(v) and v > 0:
        return v
    st = _step_times(metrics)
    return float(st.median()) if not st.empty else math.nan


IQR_PER_SIGMA = 1.349  # a normal distribution's interquartile range in standard deviations


def _step_time_spread(metrics: pd.DataFrame) -> float:
    """How much a run's step time moves within the run, as a relative standard deviation that outliers (an eval,
    a checkpoint write) cannot inflate: interquartile range / 1.349 / median (numpy's linear quantiles), warm-up
    excluded. On a shared CPU it is often tens of percent. NaN with fewer than 4 steps."""
    st = _step_times(metrics).to_numpy(float)
    if len(st) < 4:
        return math.nan
    q25, q50, q75 = np.percentile(st, [25, 50, 75])
    return float((q75 - q25) / IQR_PER_SIGMA / q50) if q50 > 0 else math.nan


def load_run(path: Path) -> Run:
    """Load one run folder, or raise `SkipRun(reason)`."""
    path = Path(path)
    meta = _read_json(path / "meta.json", "meta.json")
    missing = [k for k in REQUIRED_META if meta.get(k) is None or meta.get(k) == ""]
    if missing:
        raise SkipRun(f"meta.json lacks {', '.join(missing)}")

    if not (path / "summary.json").exists():
        raise SkipRun("no summary.json yet (running, or stopped before writing it)")
    summary = _read_json(path / "summary.json", "summary.json")
    status = str(summary.get("status", "")).strip().lower() or "unknown"
    if status not in FINISHED:
        raise SkipRun(f"status {status}" + ("" if status in STATUSES else " (unknown status)"))

    metrics = read_metrics(path / "metrics.csv")
    metric = Metric.from_meta(meta.get("metric"))
    if metric.name not in metrics.columns:
        raise SkipRun(f"no eval points in metrics.csv (no {metric.name} column)")
    evals = metrics[metrics[metric.name].notna()]
    if evals.empty:
        raise SkipRun("no eval points in metrics.csv")

    if "wallclock_s" in metrics.columns:
        wallclock = metrics.loc[metrics["wallclock_s"].notna(), ["step", "wallclock_s"]].reset_index(drop=True)
    else:
        wallclock = pd.DataFrame({"step": pd.Series(dtype=float), "wallclock_s": pd.Series(dtype=float)})
    extra = [c for c in ("eval_top5", *(e.column for e in EXTRAS)) if c in metrics.columns and c != metric.name]
    evals = evals[["step", metric.name, *extra]].reset_index(drop=True).astype(float)
    evals = evals.rename(columns={metric.name: "metric"})
    evals["score"] = evals["metric"].map(metric.as_lower_is_better)  # what targets compare: lower is better

    config = None
    cfg_path = path / "config.yaml"
    if cfg_path.exists():
        try:
            loaded = yaml.safe_load(cfg_path.read_text())
            config = loaded if isinstance(loaded, dict) else None
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            config = None  # the config is informative only; the figures come from meta/metrics/summary

    is_baseline = _as_bool(meta["is_baseline"])
    run = Run(
        path=path,
        run_id=str(meta.get("run_id") or path.name),
        recipe=str(meta["recipe"]),
        task=str(meta.get("task") or (config or {}).get("task") or ""),
        variant=str(meta.get("variant") or meta["variant_key"]),
        variant_key=str(meta["variant_key"]),
        pair_key=str(meta["pair_key"]),
        seed=meta["seed"],
        is_baseline=is_baseline,
        status=status,
        max_steps=_as_float(meta.get("max_steps")),
        params_total=_as_float(meta.get("params_total")),
        params_branch=_as_float(meta.get("params_branch")),
        created_at=str(meta.get("created_at") or ""),
        median_step_time_s=_median_step_time(summary, metrics),
        evals=evals,
        wallclock=wallclock,
        meta=meta,
        summary=summary,
        metric=metric,
        config=config,
        role=role_of_saved(meta, config, is_baseline),
        step_time_spread=_step_time_spread(metrics),
        flops_per_step=_as_float(meta.get("flops_per_step")),
        flops_per_item=_as_float(meta.get("flops_per_item")),
        flops_item=str(meta.get("flops_item") or ""),
    )
    run.evals["wallclock_s"] = [run.wallclock_at(s) for s in run.evals["step"]]
    return run


def optimizer_of(run: Run) -> str:
    """The run's optim.name from its config.yaml (runs from before the field were AdamW's)."""
    optim = (run.config or {}).get("optim")
    return str(optim.get("name") or "adamw") if isinstance(optim, dict) else "adamw"


def _optimizer_labels(runs: list[Run]) -> None:
    """Where one recipe's runs mix optimizers (`noble ablate optimizers`), every label names its optimizer, as the
    vision sweeps' labels name their augmentation: AdamW runs are labelled without it (as every run was before
    Muon), so `| adamw` is added here, never to their run folders, which other studies share."""
    used: dict[str, set[str]] = {}
    for r in runs:
        used.setdefault(r.recipe, set()).add(optimizer_of(r))
    for r in runs:
        opt = optimizer_of(r)
        if len(used[r.recipe]) > 1 and not re.search(rf"\| {opt}\b", r.variant):
            r.variant = f"{r.variant} | {opt}"


def _one_baseline_label(runs: list[Run]) -> None:
    """The baselines of one pair (recipe, pair_key) under one variant key and label, so that tables and plots show
    one baseline row and curve even when seeds' baselines were labelled differently (a sweep's group name, a plain
    `noble train`)."""
    labels: dict[tuple, set[str]] = {}
    for r in runs:
        if r.is_baseline:
            labels.setdefault((r.recipe, r.pair_key), set()).add(r.variant)
    for r in runs:
        if r.is_baseline:
            names = labels[(r.recipe, r.pair_key)]
            r.variant_key = f"baseline-{r.pair_key}"
            r.variant = next(iter(names)) if len(names) == 1 else "baseline"


def _noble_label(config: dict | None) -> str | None:
    """Today's label of a run's branch settings, from its config.yaml (older runs were labelled with less)."""
    from noble_cli import config as C

    noble = (config or {}).get("noble")
    if not isinstance(noble, dict):
        return None
    names = set(C.NobleConfig.model_fields)
    try:
        return C.variant_label(C.NobleConfig(**{k: v for k, v in noble.items() if k in names}))
    except Exception:  # noqa: BLE001 - a label is cosmetic; a broken config must not break the report
        return None


def _distinct_labels(runs: list[Run]) -> None:
    """Variants of one pair that share a label but not a variant key (e.g. two CosNet runs that differ only in
    noble.main_init_scale, labelled "cosnet r8" before labels named it) are relabelled from their configs with
    today's labels, which name every branch setting away from its default; failing that, their variant key is
    appended. Two rows of one comparison never show the same name."""
    groups: dict[tuple, dict[str, list[Run]]] = {}
    for r in runs:
        if not r.is_baseline:
            groups.setdefault((r.recipe, r.pair_key, r.variant), {}).setdefault(r.variant_key, []).append(r)
    for (_, _, label), by_key in groups.items():
        if len(by_key) < 2:
            continue
        new = {k: _noble_label(rs[0].config) for k, rs in by_key.items()}
        if None in new.values() or len(set(new.values())) < len(new):
            new = {k: f"{label} ({k[:6]})" for k in by_key}
        elif " | " in label:  # a vision sweep's group stays in the label
            new = {k: f"{v} | {label.split(' | ', 1)[1]}" for k, v in new.items()}
        for k, rs in by_key.items():
            for r in rs:
                r.variant = new[k]


def load_runs(root: Path, exclude: Path | None = None, only: set[Path] | None = None
              ) -> tuple[list[Run], list[tuple[Path, str]]]:
    """All usable runs under `root` (only the folders in `only`, resolved paths, when given: one sweep's runs in a
    results folder that several sweeps share), and the skipped folders with their reasons.

    Duplicates (same recipe, pair_key, variant_key and seed, e.g. a rerun; for baselines any label: one baseline
    per pair and seed) keep a completed run over a diverged one, then the newest by created_at (then by folder
    name); the others are skipped as duplicates.
    """
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    for d in find_run_dirs(root, exclude=exclude):
        if only is not None and d.resolve() not in only:
            continue
        try:
            runs.append(load_run(d))
        except SkipRun as e:
            skipped.append((d, str(e)))
        except Exception as e:  # noqa: BLE001 - a report must never break on one odd folder
            skipped.append((d, f"could not be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))

    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        # One baseline per pair and seed, whatever its label: two would make a variant's target ambiguous.
        variant = "baseline" if r.is_baseline else r.variant_key
        by_key.setdefault((r.recipe, r.pair_key, variant, str(r.seed)), []).append(r)
    kept: list[Run] = []
    for group in by_key.values():
        # a completed run before a diverged one (a diverged baseline's truncated curve would be an easy target),
        # then the newest
        group.sort(key=lambda r: (r.status == "completed", r.created_at, str(r.path)))
        chosen = group[-1]
        kept.append(chosen)
        what = "baseline" if chosen.is_baseline else "variant"
        for r in group[:-1]:
            skipped.append((r.path, f"duplicate of {chosen.run_id} (same {what}, pair and seed); a completed run "
                                    "is kept over a diverged one, then the newest"))
    _optimizer_labels(kept)
    _one_baseline_label(kept)
    _distinct_labels(kept)
    kept.sort(key=lambda r: (r.recipe, r.pair_key, not r.is_baseline, r.variant, str(r.seed)))
    return kept, skipped

"""PNG plots: eval loss vs step and vs wall-clock per recipe, and speedup bars with error bars.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state, no display needed).
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from noble_cli.report.build import Report
from noble_cli.report.extras import EXTRAS
from noble_cli.report.runs import Run
from noble_cli.report.settings import EFFECTS, label_without_setting, setting_names

_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
           "tab:olive", "tab:cyan", "tab:gray"]


def _stem(recipe: str, pair_key: str, several: bool, setting: str | None = None) -> str:
    """The plots' file name stem: the recipe, and where it has several settings, the setting's name (as the tables
    name it: `llm-bytes-muon`) or else its pair key's first 8 characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", recipe).strip("_") or "recipe"
    if not several:
        return s
    tag = re.sub(r"[^A-Za-z0-9]+", "-", setting).strip("-") if setting else ""
    return f"{s}-{tag or re.sub(r'[^A-Za-z0-9]+', '', pair_key)[:8]}"


def _nan(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _mean_curve(runs: list[Run], x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(x, mean, std) over seeds of the eval loss at the eval steps all `runs` share; None if they differ.

    For x = wallclock_s the x position is the mean wall-clock over seeds at that step.
    """
    if len(runs) < 2 or len({tuple(r.evals["step"]) for r in runs}) != 1:
        return None
    losses = np.stack([r.evals["metric"].to_numpy(float) for r in runs])
    xs = np.stack([r.evals[x].to_numpy(float) for r in runs]).mean(axis=0)
    ok = ~np.isnan(xs)
    return xs[ok], losses.mean(axis=0)[ok], losses.std(axis=0, ddof=1)[ok]


def _curves(ax, runs: list[Run], colors: dict[str, str], x: str, target: float, target_label: str) -> None:
    """One line per variant: the mean over seeds with a ±std band when seeds share eval steps, else per run."""
    by_variant: dict[str, list[Run]] = {}
    for r in runs:
        by_variant.setdefault(r.variant_key, []).append(r)
    for vkey, vruns in by_variant.items():
        style = dict(color=colors[vkey], linestyle="--" if vruns[0].is_baseline else "-",
                     linewidth=1.8 if vruns[0].is_baseline else 1.3, marker=".", markersize=4)
        label = vruns[0].variant
        mean = _mean_curve(vruns, x)
        if mean is not None:
            xs, mu, sd = mean
            ax.plot(xs, mu, label=f"{label} (mean ± sd of {len(vruns)} seeds)", **style)
            ax.fill_between(xs, mu - sd, mu + sd, color=colors[vkey], alpha=0.15, linewidth=0)
            continue
        for r in vruns:
            ev = r.evals[r.evals[x].notna()]
            if ev.empty:
                continue
            ax.plot(ev[x], ev["metric"], alpha=0.85, label=label, **style)
            label = None
    if not math.isnan(target):
        ax.axhline(target, color="black", linestyle=":", linewidth=1, label=target_label)
    ax.set_ylabel(runs[0].metric.name.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _speedup_bars(ax, summary: pd.DataFrame) -> None:
    """Step and wall-clock speedup per variant: the mean with its 95% CI where every seed reached the target; where
    some did not, an empty (hatched) bar up to the upper bound, marked "<"; no wall-clock bar where timing is
    noise."""
    variants = summary[~summary["is_baseline"].astype(bool)]
    xs = np.arange(len(variants))
    w = 0.38
    tops = np.ones(len(variants))
    for off, col, label, color in ((-w / 2, "step_speedup", "step speedup", "tab:blue"),
                                   (w / 2, "wallclock_speedup", "wall-clock speedup", "tab:orange")):
        full = (variants["reached_k"] == variants["n"]).to_numpy()
        noisy = variants["timing_noisy"].astype(bool).to_numpy() if col == "wallclock_speedup" else np.zeros(
            len(variants), bool)
        means = variants[col].to_numpy(float)
        lo, hi = variants[f"{col}_ci_low"].to_numpy(float), variants[f"{col}_ci_high"].to_numpy(float)
        ok = full & ~np.isnan(means) & ~noisy
        err = np.nan_to_num(np.vstack([means - lo, hi - means]), nan=0.0)[:, ok]
        ax.bar(xs[ok] + off, means[ok], w, yerr=err, capsize=4, color=color, alpha=0.85,
               label=label if ok.any() else None)  # no legend entry for bars none of which is drawn
        bounds = variants[f"{col}_bound"].to_numpy(float)
        cens = ~full & ~np.isnan(bounds) & ~noisy
        ax.bar(xs[cens] + off, bounds[cens], w, fill=False, hatch="//", edgecolor=color,
               label=f"{label}: upper bound (some seeds not reached)" if cens.any() else None)
        for i in np.nonzero(cens)[0]:
            ax.text(xs[i] + off, bounds[i], "<", ha="center", va="bottom", fontsize=9, color=color)
        for i in np.nonzero(noisy)[0]:
            ax.text(xs[i] + off, 0.05, "timing\nnoise", ha="center", va="bottom", fontsize=7, color=color,
                    rotation=90)
        tops = np.fmax(tops, np.where(ok, np.nan_to_num(hi, nan=0.0), 0.0))
        tops = np.fmax(tops, np.where(ok, means, 0.0))
        tops = np.fmax(tops, np.where(cens, bounds, 0.0))
    for i, (_, r) in enumerate(variants.iterrows()):
        if r["reached_k"] < r["n"]:
            ax.text(i, tops[i] + 0.04, f"{r['reached']} reached", ha="center", va="bottom", fontsize=8,
                    color="tab:red")
    ax.set_xlim(-0.6, len(variants) - 0.4)
    ax.set_ylim(0.0, 1.45 * float(np.nanmax(tops)) + 0.1)  # room above the bars for the legend
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="baseline (1.00x)")
    ax.set_xticks(xs)
    ax.set_xticklabels(variants["variant"], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup to the baseline's best eval loss (x)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")


def _seeds_text(n: pd.Series) -> str:
    """'n = 5 seeds' (or 'n = 3-5 seeds') over a plot's rows' seed counts."""
    lo, hi = int(n.min()), int(n.max())
    return f"n = {lo} seed{'s' if hi != 1 else ''}" if lo == hi else f"n = {lo}-{hi} seeds"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-") or "x"


def _budget_key(max_steps) -> int | None:
    return None if _nan(max_steps) else int(max_steps)


def _rows_by_setting(rep: Report) -> dict[tuple, pd.Series]:
    """Each variant's summary row, found by (recipe, budget, setting name, its label without the setting)."""
    names, s = setting_names(rep.summary), rep.summary
    rows = {}
    for _, r in s[~s["is_baseline"].astype(bool)].iterrows():
        name = names.get((r["recipe"], r["pair_key"]))
        if name is not None:
            rows[(r["recipe"], _budget_key(r["max_steps"]), name, label_without_setting(r["variant"], name))] = r
    return rows


def _setting_panel(ax, rows: dict[tuple, pd.Series], group: pd.DataFrame, col: str, name: str, scale: float) -> None:
    """Grouped bars: per variant, its Δ vs its own setting's baseline under setting a and b (mean, 95% CI), and
    above each group a - b with its CI and p."""
    first = group.iloc[0]
    recipe, steps, settings = first["recipe"], first["max_steps"], (first["setting_a"], first["setting_b"])
    xs, w = np.arange(len(group)), 0.38
    for k, (setting, color) in enumerate(zip(settings, ("tab:blue", "tab:orange"))):
        means, errs = [], []
        for _, g in group.iterrows():
            r = rows.get((recipe, _budget_key(steps), setting, g["variant"]))
            m = math.nan if r is None else scale * r[col]
            lo = math.nan if r is None else scale * r[f"{col}_ci_low"]
            hi = math.nan if r is None else scale * r[f"{col}_ci_high"]
            means.append(m)
            errs.append((0.0 if _nan(lo) else m - lo, 0.0 if _nan(hi) else hi - m))
        ax.bar(xs + (k - 0.5) * w, means, w, yerr=np.array(errs).T, capsize=4, color=color, alpha=0.85,
               label=f"with {setting}")
    low, high = ax.get_ylim()
    ax.set_ylim(low, high + 0.4 * (high - low))  # room above the bars for the a - b labels
    short = dict(EFFECTS)[col]
    for i, (_, g) in enumerate(group.iterrows()):
        if not _nan(g[f"{short}_diff"]):
            q = g.get(f"{short}_q", math.nan)
            q_text = f" q {q:.2g}" if g.get(f"{short}_n_compared", 0) >= 2 and not _nan(q) else ""
            ax.annotate(f"a-b {scale * g[f'{short}_diff']:+.3g}\n[{scale * g[f'{short}_diff_ci_low']:+.3g}, "
                        f"{scale * g[f'{short}_diff_ci_high']:+.3g}]\np {g[f'{short}_p']:.2g}{q_text}", (i, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(0, -3), textcoords="offset points",
                        ha="center", va="top", fontsize=7)
    ax.axhline(0.0, color="black", linewidth=1)
    ax.set_xticks(xs)
    ax.set_xticklabels([textwrap.fill(str(v), 18) for v in group["variant"]], fontsize=8)  # side by side, no overlap
    ax.set_ylabel(name)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _settings_plots(rep: Report, out_dir: Path) -> list[Path]:
    """Per recipe, budget and pair of settings: each variant's effect under both (report/settings.py)."""
    written, rows = [], _rows_by_setting(rep)
    for (recipe, steps, a, b), group in rep.settings.groupby(["recipe", "max_steps", "setting_a", "setting_b"],
                                                             sort=False, dropna=False):
        panels = [("final_eval_loss_delta", "Δ final eval loss vs its baseline", 1.0)]
        panels += [(e.delta, f"Δ {e.label} vs its baseline{f' ({e.delta_unit.strip()})' if e.delta_unit else ''}",
                    e.scale) for e in EXTRAS if e.key != "bpb" and group[f"{e.key}_a"].notna().any()]
        fig = Figure(figsize=(max(5.0, 1.3 * len(group) + 3), 4.5 * len(panels)))
        for k, (col, name, scale) in enumerate(panels):
            _setting_panel(fig.add_subplot(len(panels), 1, k + 1), rows, group, col, name, scale)
        budget = "" if _nan(steps) else f", {int(steps)} steps"
        fig.suptitle(f"{recipe}{budget}: each variant's effect with {a} (a) and {b} (b)\n"
                     f"mean and 95% CI over seeds ({_seeds_text(group['n'])}); a-b paired by seed, its p and q",
                     fontsize=10)
        written.append(_save(fig, out_dir / f"{_stem(recipe, '', False)}_settings_{_slug(a)}_vs_{_slug(b)}.png"))
    return written


# The names of the PNGs a report writes: what an earlier report into the same folder may have left.
PLOT_PATTERNS = ("*_eval_loss_vs_step.png", "*_eval_loss_vs_wallclock.png", "*_speedup.png", "*_settings_*_vs_*.png")


def make_plots(rep: Report, out_dir: Path) -> list[Path]:
    """Write the PNGs for every (recipe, pair_key) into `out_dir` and remove the report PNGs there that this report
    did not write (an earlier report's, of settings or recipes no longer in it: report.md would not show them, but
    the folder would); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = _write_plots(rep, out_dir)
    keep = {p.resolve() for p in written}
    for pattern in PLOT_PATTERNS:
        for stale in out_dir.glob(pattern):
            if stale.resolve() not in keep:
                stale.unlink(missing_ok=True)
    return written


def _write_plots(rep: Report, out_dir: Path) -> list[Path]:
    written: list[Path] = []
    if rep.summary.empty:
        return written
    pairs_per_recipe = rep.summary.groupby("recipe")["pair_key"].nunique().to_dict()
    names = setting_names(rep.summary)
    if len({(r, _stem(r, "", True, n)) for (r, _), n in names.items()}) < len(names):
        names = {}  # two settings whose names differ only in punctuation: the pair keys tell the files apart
    for (recipe, pair_key), summ in rep.summary.groupby(["recipe", "pair_key"], sort=False):
        several = pairs_per_recipe[recipe] > 1
        stem = _stem(recipe, pair_key, several, names.get((recipe, pair_key)))
        # the title names the setting too, so two plots of one recipe never look alike out of their files
        title = f"{recipe} ({names.get((recipe, pair_key), 'pair ' + str(pair_key)[:8])})" if several else recipe
        runs = [r for r in rep.runs if r.recipe == recipe and r.pair_key == pair_key]
        runs.sort(key=lambda r: (not r.is_baseline, r.variant, str(r.seed)))
        colors, i = {}, 0
        for _, s in summ.iterrows():
            if s["is_baseline"]:
                colors[s["variant_key"]] = "black"
            else:
                colors[s["variant_key"]] = _COLORS[i % len(_COLORS)]
                i += 1
        base = summ[summ["is_baseline"]]
        target = float(base["target"].iloc[0]) if not base.empty else math.nan
        n_seeds = int(base["n"].iloc[0]) if not base.empty else 1
        tlabel = f"target {target:.4f} (baseline best" + (", mean over seeds)" if n_seeds > 1 else ")")

        for x, xlabel, suffix in (("step", "step", "eval_loss_vs_step"),
                                  ("wallclock_s", "training time (s, evaluation excluded)",
                                   "eval_loss_vs_wallclock")):
            if x == "wallclock_s" and not any(r.evals["wallclock_s"].notna().any() for r in runs):
                continue
            fig = Figure(figsize=(7, 4.5))
            ax = fig.add_subplot()
            _curves(ax, runs, colors, x, target, tlabel)
            ax.set_xlabel(xlabel)
            ax.set_title(f"{title}: eval loss vs {xlabel.split(' (')[0]}\n({_seeds_text(summ['n'])})",
                         fontsize=10)
            written.append(_save(fig, out_dir / f"{stem}_{suffix}.png"))

        if (~summ["is_baseline"]).any():
            fig = Figure(figsize=(max(5.0, 1.1 * (~summ["is_baseline"]).sum() + 3), 4.5))
            ax = fig.add_subplot()
            _speedup_bars(ax, summ)
            ax.set_title(f"{title}: speedup vs the baseline\n"
                         f"(mean, 95% CI over {_seeds_text(summ['n'])}; '<' upper bound)", fontsize=10)
            written.append(_save(fig, out_dir / f"{stem}_speedup.png"))
    return written + _settings_plots(rep, out_dir)

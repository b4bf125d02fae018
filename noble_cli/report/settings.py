"""A recipe run under several settings (Mixup/CutMix on and off, AdamW and Muon, ...): what each setting is called,
and whether the setting changes what a variant does.

The second is the question behind the paper's ViT caveat (NOBLE helps only with Mixup/CutMix off) and behind any
"NOBLE helps under optimizer A but not B": not two separate verdicts, one per setting, but one test of their
difference. Per seed, a variant's effect in a setting is its Δ against that setting's own baseline (the same seed);
the setting's effect on it is that Δ in setting A minus the Δ in setting B, paired over the seeds both have (a
difference in differences), with its 95% CI and the paired t-test's p, and that p's q over the variants tested
between the same two settings (a study asks it of the branch and each of its controls: one p below 0.05 among
four is likely by chance alone).
"""

from __future__ import annotations

import itertools
import math

import pandas as pd

from noble_cli.report.extras import EXTRAS
from noble_cli.report.stats import fdr_adjusted, paired

# (runs-table column of a per-seed Δ vs the baseline, short name in the columns below)
EFFECTS = (("final_eval_loss_delta", "loss"), *((e.delta, e.key) for e in EXTRAS))

_NAMES = [name for _, name in EFFECTS + (("step_speedup", "speedup"),)]
SETTING_COLUMNS = ["recipe", "max_steps", "variant", "role", "setting_a", "setting_b", "n", "seeds"] + [
    f"{name}_{part}" for name in _NAMES for part in ("a", "b", "diff", "diff_std", "diff_ci_low", "diff_ci_high", "p",
                                                     "q", "n_compared")]
_FAMILY = ["recipe", "max_steps", "setting_a", "setting_b"]  # one comparison: its variants are adjusted together


def setting_names(frame: pd.DataFrame, label: str = "variant") -> dict[tuple, str]:
    """Per (recipe, pair_key): the name of what its rows share, for the "setting" column and the headline titles.

    A sweep labels each setting's runs after a bar ("baseline | muon", "dense-matched(cosnet r8) | mixup+cutmix
    off"), so the setting is named by the part after the bar of its baseline's label (`label="variant"`) or of its
    control's (`label="reference"`); a pair without one is named by its pair key (the hash of what it shares).
    """
    rows = frame[frame["is_baseline"].astype(bool)] if label == "variant" else frame
    names = {}
    for _, r in rows.iterrows():
        text = str(r[label])
        if " | " in text:
            names.setdefault((r["recipe"], r["pair_key"]), text.split(" | ", 1)[1])
    return names


def label_without_setting(variant: str, setting: str) -> str:
    """'cosnet r8 | muon' -> 'cosnet r8'; 'cosnet r8 | muon, branch muon' -> 'cosnet r8, branch muon': the name
    under which one variant is found in every setting."""
    head, bar, tail = str(variant).partition(" | ")
    if bar and tail == setting:
        return head
    if bar and tail.startswith(setting + ", "):
        return head + tail[len(setting):]
    return str(variant)


def _per_seed(g: pd.DataFrame) -> pd.DataFrame:
    return g.assign(_seed=g["seed"].astype(str)).drop_duplicates("_seed").set_index("_seed")


def _compare(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """The figures of one variant in setting a against setting b, over the seeds both have."""
    seeds = [s for s in a.index if s in b.index]
    a, b = a.loc[seeds], b.loc[seeds]
    row: dict = {"n": len(seeds), "seeds": ",".join(seeds)}
    both_reached = bool(a["reached"].astype(bool).all() and b["reached"].astype(bool).all())
    for col, name in EFFECTS + (("step_speedup", "speedup"),):
        if col == "step_speedup" and not both_reached:  # a speedup is only defined where every seed reached
            va = vb = pd.Series([math.nan] * len(seeds), dtype=float)
        else:
            va, vb = pd.to_numeric(a[col], errors="coerce"), pd.to_numeric(b[col], errors="coerce")
        d = paired(va.to_numpy(float), vb.to_numpy(float))
        row.update({f"{name}_a": float(va.mean()) if va.notna().any() else math.nan,
                    f"{name}_b": float(vb.mean()) if vb.notna().any() else math.nan,
                    f"{name}_diff": d.mean, f"{name}_diff_std": d.std, f"{name}_diff_ci_low": d.low,
                    f"{name}_diff_ci_high": d.high, f"{name}_p": d.p})
    return row


def setting_effects(runs_table: pd.DataFrame) -> pd.DataFrame:
    """One row per (recipe, budget, pair of settings, variant found in both): the variant's effect (Δ vs its own
    baseline, seed by seed) in setting a and b, and a - b with its 95% CI, p and q (BH over the variants of the same
    recipe, budget and pair of settings; `*_n_compared` p-values); the step-speedup difference only
    where every seed reached the target in both settings. Settings are named as in `setting_names` and ordered
    alphabetically within a pair; runs of a pair without a name (no sweep label) take no part."""
    if runs_table.empty:
        return pd.DataFrame(columns=SETTING_COLUMNS)
    names = setting_names(runs_table)
    t = runs_table[~runs_table["is_baseline"].astype(bool)]
    t = t.assign(setting=[names.get((r, p)) for r, p in zip(t["recipe"], t["pair_key"])])
    t = t[t["setting"].notna()]
    t = t.assign(base=[label_without_setting(v, s) for v, s in zip(t["variant"], t["setting"])])
    rows = []
    for (recipe, max_steps), g in t.groupby(["recipe", "max_steps"], sort=False, dropna=False):
        for a, b in itertools.combinations(sorted(g["setting"].unique()), 2):
            ga, gb = g[g["setting"] == a], g[g["setting"] == b]
            for variant in dict.fromkeys(ga["base"]):
                va, vb = ga[ga["base"] == variant], gb[gb["base"] == variant]
                if vb.empty:
                    continue
                row = {"recipe": recipe, "max_steps": max_steps, "variant": variant, "role": va["role"].iloc[0],
                       "setting_a": a, "setting_b": b}
                row.update(_compare(_per_seed(va), _per_seed(vb)))
                if row["n"]:
                    rows.append(row)
    out = pd.DataFrame(rows, columns=SETTING_COLUMNS)
    for name in _NAMES:  # q: BH over the variants of one comparison, as in the main table (figures.py)
        out[f"{name}_q"], out[f"{name}_n_compared"] = math.nan, 0
        for _, g in out.groupby(_FAMILY, sort=False, dropna=False):
            out.loc[g.index, f"{name}_q"] = fdr_adjusted(g[f"{name}_p"])
            out.loc[g.index, f"{name}_n_compared"] = int(g[f"{name}_p"].notna().sum())
    return out

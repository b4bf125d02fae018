"""The report's headlines: per comparison, lines that each say which comparison they are (vs the baseline, vs the
dense-matched control, vs the init-only control), and per pair of settings whether the setting changes the branch's
effect."""

from __future__ import annotations

import math

import pandas as pd

from noble_cli.report.build import Report
from noble_cli.report.cells import (
    delta_cell,
    diff_cell,
    extra_delta_cell,
    fmt_p,
    is_nan,
    multi_setting,
    speedup_cell,
    tidy,
    wallclock_cell,
)
from noble_cli.report.extras import EXTRAS
from noble_cli.report.settings import setting_names
from noble_cli.roles import CONTROL_ROLES


def _setting_line(r: pd.Series) -> str:
    """'cosnet r8: final eval loss Δ -0.0630 with adamw, +0.0053 with muon; a - b -0.0683 [...] (p = 0.02)'."""
    a, b, n = r["setting_a"], r["setting_b"], int(r["n"])
    seeds = f"{n} seed{'s' if n != 1 else ''} under both" + (": no CI or p from one pair" if n == 1 else "")
    text = (f"{r['variant']} ({seeds}): final eval loss Δ {tidy(r['loss_a']):+.4f} with {a}, "
            f"{tidy(r['loss_b']):+.4f} with {b}; the difference {diff_cell(r, 'loss')}")
    if not is_nan(r["loss_p"]):
        lo, hi = r["loss_diff_ci_low"], r["loss_diff_ci_high"]
        text += f" (p = {fmt_p(r['loss_p'])}" + _q(r, "loss_q", "loss_n_compared") + \
            (": the 95% CI contains 0)" if lo <= 0.0 <= hi else ")")
    for e in EXTRAS:
        if e.key == "bpb" or is_nan(r[f"{e.key}_diff"]):  # bpb is the loss in other units: said once is enough
            continue
        fmt = "+" + e.fmt
        text += (f"; {e.name} Δ {tidy(e.scale * r[f'{e.key}_a']):{fmt}}{e.delta_unit} with {a}, "
                 f"{tidy(e.scale * r[f'{e.key}_b']):{fmt}}{e.delta_unit} with {b}, "
                 f"difference {diff_cell(r, e.key, fmt, e.scale, e.delta_unit)}")
        if not is_nan(r[f"{e.key}_p"]):
            text += f" (p = {fmt_p(r[f'{e.key}_p'])}" + _q(r, f"{e.key}_q", f"{e.key}_n_compared") + ")"
    if not is_nan(r["speedup_diff"]):
        text += (f"; step speedup {r['speedup_a']:.2f}x with {a}, {r['speedup_b']:.2f}x with {b}, difference "
                 f"{diff_cell(r, 'speedup', '+.2f', 1.0, 'x')}")
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
        budget = "" if is_nan(max_steps) else f" · {int(max_steps)} steps"
        title = f"{recipe}{budget} · {a} vs {b}: does the setting change the branch's effect?"
        out.append((title, [_setting_line(r) for _, r in nobles.iterrows()]))
    return out


def _q(r: pd.Series, q_col: str, n_col: str) -> str:
    n = r.get(n_col, 0)
    return f", q = {fmt_p(r[q_col])} over {int(n)} variants" if n >= 2 and not is_nan(r.get(q_col, math.nan)) else ""


def _figures(r: pd.Series) -> str:
    """'step speedup 1.32x [1.10, 1.54] (5/5 seeds, p = 0.012), final eval loss Δ -0.0410 [...] (p = 0.003)'."""
    sp = speedup_cell(r)
    seeds = f"{r['reached']} seeds reached"
    if r["reached_k"] == r["n"] and not is_nan(r["p_value_speedup"]):
        seeds += f", p = {fmt_p(r['p_value_speedup'])}" + _q(r, "q_value_speedup", "n_compared_speedup")
        if r["step_speedup_ci_low"] <= 1.0 <= r["step_speedup_ci_high"]:
            seeds += ": the 95% CI contains 1.00x"
    text = f"step speedup {sp} ({seeds}); final eval loss Δ {delta_cell(r, 'final_eval_loss_delta')}"
    if not is_nan(r["p_value"]):
        text += f" (p = {fmt_p(r['p_value'])}" + _q(r, "q_value", "n_compared")
        lo, hi = r["final_eval_loss_delta_ci_low"], r["final_eval_loss_delta_ci_high"]
        text += ": the 95% CI contains 0)" if not is_nan(lo) and lo <= 0.0 <= hi else ")"
    for e in EXTRAS:
        if not is_nan(r.get(e.delta, math.nan)):
            text += f"; {e.name} Δ {extra_delta_cell(r, e)}"
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
    multi, names = multi_setting(rep.summary), setting_names(rep.summary)
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

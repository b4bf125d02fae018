"""`noble report`: figures checked against numbers worked out by hand, skipping of bad run folders, files, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import typer
import yaml
from typer.testing import CliRunner

from noble_cli.errors import NobleError
from noble_cli.report import build_report, load_report
from noble_cli.report.cells import display_rows
from noble_cli.report.cli import parse_formats, report
from noble_cli.report.figures import steps_to_target
from noble_cli.report.headlines import headlines
from noble_cli.report.plots import make_plots
from noble_cli.report.stats import estimate, paired

STEPS = [100, 200, 300, 400]
PAIR = "pairA"


def write_run(root: Path, run_id: str, *, variant: str, evals: list[float], seed: int = 0, baseline: bool = False,
              recipe: str = "tiny", pair_key: str = PAIR, variant_key: str | None = None, step_time: float = 0.1,
              median: float | None = "same", params_total: int = 1000, status: str = "completed",
              eval_rows_separate: bool = False, top1: list[float] | None = None, created_at: str = "2026-01-01",
              summary: bool = True, step_times: list[float] | None = None, bpb: list[float] | None = None,
              meta_extra: dict | None = None, noble: dict | None = None,
              extra_evals: dict[str, list[float]] | None = None) -> Path:
    """A run folder per the contract. Training rows every 50 steps with step_time_s = `step_time` (the first row is
    a slow warm-up step of 5 s; `step_times` gives the other seven instead) and wallclock_s = step_time * step; eval
    points at STEPS (with eval_bpb = `bpb`). Eval rows are either in the same rows as training (merged) or separate
    rows with only step, wallclock_s and eval columns."""
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    vkey = variant_key or ("base" if baseline else variant.replace(" ", "_"))
    (d / "config.yaml").write_text(yaml.safe_dump({
        "recipe": recipe, "task": "lm", "seed": seed, "name": run_id, "model": {}, "data": {}, "optim": {"lr": 1e-3},
        "schedule": {}, "trainer": {"max_steps": 400, "batch_size": 8},
        "noble": noble or {"branch": "none" if baseline else variant.split()[0], "rank": 32, "targets": "all",
                           "dense_match": False}}))
    (d / "meta.json").write_text(json.dumps({
        "run_id": run_id, "recipe": recipe, "task": "classify" if top1 else "lm", "variant": variant,
        "variant_key": vkey, "pair_key": pair_key, "seed": seed, "is_baseline": baseline, "max_steps": 400,
        "git_commit": "abc", "git_dirty": False, "versions": {}, "device": "cpu", "params_total": params_total,
        "params_branch": 0 if baseline else params_total - 1000, "created_at": created_at, **(meta_extra or {})}))
    rows = []
    for i, s in enumerate(range(50, 401, 50)):
        st = 5.0 if s == 50 else (step_times[i - 1] if step_times else step_time)
        rows.append({"step": s, "train_loss": 5.0 - s / 200, "step_time_s": st, "wallclock_s": step_time * s})
    ev = {s: (loss, (top1[i] if top1 else None), (bpb[i] if bpb else None))
          for i, (s, loss) in enumerate(zip(STEPS, evals))}
    if eval_rows_separate:
        for s, (loss, t1, b) in ev.items():
            row = {"step": s, "wallclock_s": step_time * s, "eval_loss": loss}
            if top1:
                row["eval_top1"] = t1
            if bpb:
                row["eval_bpb"] = b
            rows.append(row)
    else:
        for row in rows:
            if row["step"] in ev:
                row["eval_loss"] = ev[row["step"]][0]
                if top1:
                    row["eval_top1"] = ev[row["step"]][1]
                if bpb:
                    row["eval_bpb"] = ev[row["step"]][2]
    for col, values in (extra_evals or {}).items():  # more eval columns, at the eval points
        for row in rows:
            if row["step"] in ev:
                row[col] = values[STEPS.index(row["step"])]
    pd.DataFrame(rows).to_csv(d / "metrics.csv", index=False)
    if summary:
        summ = {"best_eval_loss": min(evals), "best_step": STEPS[evals.index(min(evals))],
                "final_eval_loss": evals[-1], "train_time_s": step_time * 400, "status": status}
        if median == "same":
            summ["median_step_time_s"] = step_time
        elif median is not None:
            summ["median_step_time_s"] = median
        (d / "summary.json").write_text(json.dumps(summ))
    return d


def make_results(r: Path) -> Path:
    """The shared scenario (numbers used by the tests below)."""
    # Baselines, step time 0.1 s, 1000 params. Target = best eval loss, at step 400 in every seed.
    write_run(r, "b0", variant="baseline", baseline=True, seed=0, evals=[4.0, 3.5, 3.2, 3.1])  # target 3.1
    write_run(r, "b1", variant="baseline", baseline=True, seed=1, evals=[4.0, 3.6, 3.3, 3.2])  # target 3.2
    write_run(r, "b2", variant="baseline", baseline=True, seed=2, evals=[4.0, 3.5, 3.2, 3.0],  # target 3.0
              median=None)  # no median in summary.json: fallback to metrics (warm-up 5 s row dropped) = 0.1
    # cosnet r32: step time 0.12 s (+20%), 1050 params (+5%); eval rows written as separate rows.
    cos = dict(variant="cosnet r32", step_time=0.12, params_total=1050, eval_rows_separate=True)
    write_run(r, "c0", seed=0, evals=[3.9, 3.3, 3.0, 2.9], **cos)
    write_run(r, "c1", seed=1, evals=[3.8, 3.2, 3.1, 3.05], **cos)
    write_run(r, "c2", seed=2, evals=[3.9, 3.4, 3.1, 2.95], **cos)
    # gelu r32: never reaches (seeds 0 and 1).
    write_run(r, "g0", variant="gelu r32", seed=0, evals=[4.0, 3.6, 3.4, 3.3], params_total=1040)
    write_run(r, "g1", variant="gelu r32", seed=1, evals=[4.1, 3.7, 3.5, 3.4], params_total=1040)
    # tanh r32: reaches in seed 0 (same curve as c0, step time 0.1), not in seed 1.
    write_run(r, "t0", variant="tanh r32", seed=0, evals=[3.9, 3.3, 3.0, 2.9], params_total=1040)
    write_run(r, "t1", variant="tanh r32", seed=1, evals=[3.9, 3.5, 3.4, 3.3], params_total=1040)
    # Broken / partial folders, nested one level deeper too.
    bad = write_run(r, "corrupt", variant="cosnet r32", seed=3, evals=[3.9, 3.3, 3.0, 2.9])
    (bad / "meta.json").write_text("{not json")
    write_run(r / "sweeps" / "s1", "running", variant="cosnet r32", seed=4, evals=[3.9, 3.3, 3.0, 2.9],
              status="running")
    write_run(r / "sweeps" / "s1", "nosummary", variant="cosnet r32", seed=5, evals=[3.9, 3.3, 3.0, 2.9],
              summary=False)
    write_run(r, "orphan", variant="cosnet r32", seed=7, evals=[3.9, 3.3, 3.0, 2.9])  # no baseline for seed 7
    noeval = write_run(r, "noeval", variant="cosnet r32", seed=8, evals=[3.9, 3.3, 3.0, 2.9])
    pd.DataFrame({"step": [1, 2], "train_loss": [5, 4]}).to_csv(noeval / "metrics.csv", index=False)
    garbled = write_run(r, "garbled", variant="cosnet r32", seed=9, evals=[3.9, 3.3, 3.0, 2.9])
    (garbled / "metrics.csv").write_bytes(b'step,eval_loss\n1,"2\n')
    nometa = write_run(r, "nometa", variant="cosnet r32", seed=10, evals=[3.9, 3.3, 3.0, 2.9])
    (nometa / "meta.json").unlink()
    return r


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    return make_results(tmp_path / "results")


def row(summary: pd.DataFrame, variant: str) -> pd.Series:
    return summary[summary["variant"] == variant].iloc[0]


def test_steps_to_target_interpolates():
    ev = pd.DataFrame({"step": STEPS, "score": [3.9, 3.3, 3.0, 2.9]})
    # crosses 3.1 between 200 (3.3) and 300 (3.0): 200 + 100 * (3.3 - 3.1) / (3.3 - 3.0) = 266.67
    assert steps_to_target(ev, 3.1) == pytest.approx(266.6667, abs=1e-3)
    assert steps_to_target(ev, 3.3) == 200.0  # exactly equal counts as reached: 100 + 100 * 0.6/0.6
    assert steps_to_target(ev, 3.95) == 100.0  # already below at the first eval point: its step
    assert math.isnan(steps_to_target(ev, 2.8))


def test_per_run_figures(results: Path):
    runs, summary, skipped = build_report(results)
    c0 = runs[runs["run_id"] == "c0"].iloc[0]
    assert c0["target"] == pytest.approx(3.1)
    assert c0["baseline_best_step"] == 400
    assert c0["steps_to_target"] == pytest.approx(266.6667, abs=1e-3)
    assert c0["step_speedup"] == pytest.approx(1.5)  # 400 / 266.67
    assert c0["param_overhead"] == pytest.approx(0.05)  # 1050 / 1000 - 1
    assert c0["step_time_overhead"] == pytest.approx(0.2)  # 0.12 / 0.10 - 1
    # baseline at step 400: 0.1 * 400 = 40 s; variant at 266.67: 0.12 * 266.67 = 32 s -> 1.25 (= 1.5 / 1.2)
    assert c0["wallclock_speedup"] == pytest.approx(1.25)
    assert c0["final_eval_loss_delta"] == pytest.approx(-0.2)  # 2.9 - 3.1
    c2 = runs[runs["run_id"] == "c2"].iloc[0]
    # b2 has no median in summary.json: median of step_time_s after the warm-up row = 0.1 -> overhead 0.2 again
    assert c2["step_time_overhead"] == pytest.approx(0.2)
    # target 3.0: crosses between 300 (3.1) and 400 (2.95): 300 + 100 * 0.1 / 0.15 = 366.67 -> 400/366.67 = 1.0909
    assert c2["step_speedup"] == pytest.approx(1.090909, abs=1e-5)
    b0 = runs[runs["run_id"] == "b0"].iloc[0]
    assert b0["step_speedup"] == 1.0 and b0["wallclock_speedup"] == 1.0 and b0["param_overhead"] == 0.0


def test_summary_across_seeds(results: Path):
    """Mean, 95% CI and p-value worked out by hand (t quantile from a table: t_{0.975, 2} = 4.302653)."""
    _, summary, _ = build_report(results)
    cos = row(summary, "cosnet r32")
    assert cos["n"] == 3 and cos["reached"] == "3/3" and not cos["censored"]
    # speedups: 1.5 (c0), 400/200 = 2.0 (c1: 3.2 reached exactly at 200), 1.090909 (c2)
    # mean = 4.590909 / 3 = 1.530303; deviations -0.030303, 0.469697, -0.439394;
    # squares 0.000918 + 0.220615 + 0.193067 = 0.414600; / 2 = 0.207300; sqrt = 0.455302
    # CI: 1.530303 ± 4.302653 * 0.455302 / sqrt(3) = 1.530303 ± 1.131034 -> [0.399269, 2.661337]
    # p vs 1: t = 0.530303 / 0.262869 = 2.017366; df = 2: p = 1 - t / sqrt(2 + t^2) = 1 - 2.017366 / 2.463688 = 0.181161
    assert cos["step_speedup"] == pytest.approx(1.530303, abs=1e-5)
    assert cos["step_speedup_std"] == pytest.approx(0.455302, abs=1e-5)
    assert cos["step_speedup_ci_low"] == pytest.approx(0.399269, abs=1e-5)
    assert cos["step_speedup_ci_high"] == pytest.approx(2.661337, abs=1e-5)
    assert cos["p_value_speedup"] == pytest.approx(0.181161, abs=1e-5)
    # wall-clock: 40/32 = 1.25, 40/(0.12*200) = 1.666667, 40/(0.12*366.667) = 0.909091 -> mean 1.275253
    assert cos["wallclock_speedup"] == pytest.approx(1.275253, abs=1e-5)
    # final deltas -0.2, -0.15, -0.05: mean -0.133333, sd 0.076376, t = -0.133333 / (0.076376/sqrt 3) = -3.02372
    # df = 2 has a closed form: p = 1 - |t| / sqrt(2 + t^2) = 1 - 3.02372 / 3.33809 = 0.094175
    # CI: -0.133333 ± 4.302653 * 0.076376 / sqrt(3) = -0.133333 ± 0.189729 -> [-0.323062, 0.056396]
    assert cos["final_eval_loss_delta"] == pytest.approx(-0.133333, abs=1e-5)
    assert cos["final_eval_loss_delta_std"] == pytest.approx(0.076376, abs=1e-5)
    assert cos["p_value"] == pytest.approx(0.094175, abs=1e-4)
    assert cos["final_eval_loss_delta_ci_low"] == pytest.approx(-0.323062, abs=1e-5)
    assert cos["final_eval_loss_delta_ci_high"] == pytest.approx(0.056396, abs=1e-5)
    assert cos["param_overhead"] == pytest.approx(0.05)
    # step time +20% in every seed, and no timing noise at all (every baseline at 0.1 s, constant within runs)
    assert cos["step_time_overhead"] == pytest.approx(0.2) and cos["timing_noise"] == pytest.approx(0.0)
    assert not cos["timing_noisy"]
    assert cos["best"]

    gelu = row(summary, "gelu r32")  # never reached: upper bound 400/400 in both seeds
    assert gelu["reached"] == "0/2" and math.isnan(gelu["step_speedup"]) and math.isnan(gelu["wallclock_speedup"])
    assert gelu["step_speedup_bound"] == pytest.approx(1.0)
    assert not gelu["best"]

    # reached in seed 0 only (1.5x): no mean over the seed that reached. Seed 1 needed more than its 400-step budget:
    # its speedup < 400/400 = 1.0, so the mean over both seeds < (1.5 + 1.0) / 2 = 1.25
    tanh = row(summary, "tanh r32")
    assert tanh["reached"] == "1/2" and tanh["censored"] and math.isnan(tanh["step_speedup"])
    assert tanh["step_speedup_bound"] == pytest.approx(1.25)
    assert tanh["steps_to_target_bound"] == pytest.approx((266.6667 + 400) / 2, abs=1e-3)
    assert not tanh["best"] and math.isnan(tanh["p_value_speedup"])

    # Several variants against one baseline: q adjusts the Δ p-values for it (Benjamini-Hochberg). gelu's deltas
    # (+0.2, +0.2) have no spread, so no p. tanh: deltas -0.2, +0.1: t = -0.05 / (0.212132 / sqrt 2) = -0.333333,
    # df = 1: p = 1 - (2 / pi) atan(1/3) = 0.795167. Sorted p: 0.094175, 0.795167 -> q = min(p_i * 2 / i, later q):
    # cosnet 0.18835, tanh 0.795167. Speedups: only cosnet has a p, so its q is its p.
    assert tanh["p_value"] == pytest.approx(0.795167, abs=1e-5) and math.isnan(gelu["p_value"])
    assert cos["n_compared"] == tanh["n_compared"] == 2
    assert cos["q_value"] == pytest.approx(0.18835, abs=1e-4) and tanh["q_value"] == pytest.approx(0.795167, abs=1e-5)
    assert math.isnan(gelu["q_value"]) and cos["n_compared_speedup"] == 1
    assert cos["q_value_speedup"] == pytest.approx(cos["p_value_speedup"])
    _, rows, _ = display_rows(summary)
    cells = {r[1]: r for r in rows}
    assert cells["cosnet r32"][13] == "0.094 (q 0.188)" and cells["cosnet r32"][6] == "0.181"  # one speedup p: no q

    base = row(summary, "baseline")
    assert base["is_baseline"] and base["n"] == 3 and base["step_speedup"] == 1.0
    assert base["target"] == pytest.approx(3.1)  # (3.1 + 3.2 + 3.0) / 3
    assert summary["variant"].iloc[0] == "baseline"  # baseline first
    # then the variant that reached everywhere, then the censored ones by their bound
    assert list(summary["variant"]) == ["baseline", "cosnet r32", "tanh r32", "gelu r32"]


def test_skipped_with_reasons(results: Path):
    runs, summary, skipped = build_report(results)
    reasons = {p.name: reason for p, reason in skipped}
    assert "corrupt meta.json" in reasons["corrupt"]
    assert "status running" in reasons["running"]
    assert "no summary.json" in reasons["nosummary"]
    assert "no baseline" in reasons["orphan"]
    assert "no eval points" in reasons["noeval"]
    assert "metrics.csv" in reasons["garbled"]
    assert "missing meta.json" in reasons["nometa"]
    assert set(runs["run_id"]) == {"b0", "b1", "b2", "c0", "c1", "c2", "g0", "g1", "t0", "t1"}


def test_report_written_into_the_results_folder_itself(tmp_path: Path):
    """`noble report R --out R`: the output folder is the results folder, and its runs are still found."""
    from noble_cli.report.runs import load_runs

    r = tmp_path / "res"
    write_run(r, "b0", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1])
    (r / "report.md").write_text("an older report")
    runs, _ = load_runs(r, exclude=r)
    assert [x.run_id for x in runs] == ["b0"]
    assert [x.run_id for x in load_runs(tmp_path, exclude=r)[0]] == []  # a separate output folder is skipped


def test_duplicate_keeps_newest(tmp_path: Path):
    r = tmp_path / "res"
    write_run(r, "b0", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1])
    write_run(r, "old", variant="cosnet r32", evals=[4.0, 3.6, 3.4, 3.3], created_at="2026-01-01")
    write_run(r, "new", variant="cosnet r32", evals=[3.9, 3.3, 3.0, 2.9], created_at="2026-01-02")
    runs, summary, skipped = build_report(r)
    assert set(runs["run_id"]) == {"b0", "new"}
    assert [p.name for p, reason in skipped if "duplicate" in reason] == ["old"]


def test_one_baseline_per_pair_and_seed_whatever_its_label(tmp_path: Path):
    """Two baselines of one pair and seed (say a sweep's, named after its augmentation group, and a plain
    `noble train` one): the variant's target comes from the newest, and the other is listed as a duplicate."""
    r = tmp_path / "res"
    write_run(r, "bA", variant="baseline", baseline=True, variant_key="base-a", evals=[4.0, 3.5, 3.2, 3.0],
              created_at="2026-01-02")
    write_run(r, "bB", variant="baseline | group", baseline=True, variant_key="base-b", evals=[4.0, 3.6, 3.4, 3.3],
              created_at="2026-01-01")
    write_run(r, "v", variant="cosnet r32", evals=[3.9, 3.3, 3.0, 2.9])
    runs, _, skipped = build_report(r)
    assert set(runs["run_id"]) == {"bA", "v"}
    assert runs.set_index("run_id").loc["v", "baseline_run_id"] == "bA"
    assert [p.name for p, reason in skipped if "duplicate of bA (same baseline" in reason] == ["bB"]


def test_a_completed_baseline_wins_over_a_newer_diverged_one_and_labels_merge(tmp_path: Path):
    r = tmp_path / "res"
    write_run(r, "bOK", variant="baseline", baseline=True, variant_key="base-a", evals=[4.0, 3.5, 3.2, 3.0],
              created_at="2026-01-01")
    write_run(r, "bDIV", variant="baseline", baseline=True, variant_key="base-a",
              evals=[4.0, 3.6, float("nan"), float("nan")], status="diverged", created_at="2026-01-02")
    write_run(r, "b1", variant="baseline | group", baseline=True, variant_key="base-b", seed=1,
              evals=[4.0, 3.5, 3.2, 3.0])
    for seed in (0, 1):
        write_run(r, f"v{seed}", variant="cosnet r32", seed=seed, evals=[3.9, 3.5, 3.3, 3.2])
    runs, summary, skipped = build_report(r)
    assert runs.set_index("run_id").loc["v0", "baseline_run_id"] == "bOK"  # not the diverged run's easy target
    assert not runs.set_index("run_id").loc["v0", "reached"]
    assert [p.name for p, reason in skipped if "duplicate of bOK" in reason] == ["bDIV"]
    base = summary[summary["is_baseline"].astype(bool)]
    assert len(base) == 1 and int(base["n"].iloc[0]) == 2  # seeds 0 and 1 under one baseline row
    assert base["variant"].iloc[0] == "baseline"  # two labels ("baseline", "baseline | group") become one


def test_diverged_run_kept_with_finite_points(tmp_path: Path):
    r = tmp_path / "res"
    write_run(r, "b0", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1])
    # reaches 3.1 between 200 (3.3) and 300 (3.0) before diverging: 266.67 -> 1.5x; the nan point is ignored
    write_run(r, "v0", variant="cosnet r32", evals=[3.9, 3.3, 3.0, float("nan")], status="diverged")
    write_run(r, "v1", variant="gelu r32", evals=[3.9, 3.6, float("inf"), float("nan")], status="diverged")
    runs, summary, skipped = build_report(r)
    assert not skipped
    assert row(summary, "cosnet r32")["step_speedup"] == pytest.approx(1.5)
    assert row(summary, "cosnet r32")["final_eval_loss"] == pytest.approx(3.0)  # last finite eval point
    assert row(summary, "gelu r32")["reached"] == "0/1"


def test_classification_top1(tmp_path: Path):
    r = tmp_path / "res"
    write_run(r, "b0", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1], top1=[0.1, 0.3, 0.4, 0.45])
    write_run(r, "v0", variant="cosnet r32", evals=[3.9, 3.3, 3.0, 2.9], top1=[0.1, 0.35, 0.5, 0.48])
    _, summary, _ = build_report(r)
    v = row(summary, "cosnet r32")
    assert v["best_top1"] == pytest.approx(0.5) and v["best_top1_delta"] == pytest.approx(0.05)
    assert math.isnan(v["best_top1_std"]) and math.isnan(v["p_value"])  # n = 1


def test_estimates_against_closed_forms():
    # [1,2,3,4] vs 0: mean 2.5, sd 1.290994, t = 2.5 / (1.290994/2) = 3.872983, df 3. Student's t with 3 degrees of
    # freedom: p = 1 - (2/pi) (atan(t/sqrt3) + sqrt3 t / (t^2 + 3)) = 1 - 0.63662 (1.150262 + 0.372678) = 0.030466
    # CI: 2.5 ± t_{0.975,3} 3.182446 * 0.645497 = 2.5 ± 2.054265
    e = estimate([1, 2, 3, 4])
    assert e.mean == 2.5 and e.std == pytest.approx(1.290994, abs=1e-6)
    assert e.p == pytest.approx(0.030466, abs=1e-5)
    assert (e.low, e.high) == (pytest.approx(0.445735, abs=1e-5), pytest.approx(4.554265, abs=1e-5))
    assert estimate([2.0, 3.0], mu=2.5).p == pytest.approx(1.0)
    one = estimate([1.5])
    assert one.mean == 1.5 and math.isnan(one.std) and math.isnan(one.low) and math.isnan(one.p)
    flat = estimate([1.2, 1.2, 1.2], mu=1.0)  # no spread: neither a CI nor a p-value is defined
    assert flat.mean == pytest.approx(1.2) and flat.std == 0 and math.isnan(flat.p) and math.isnan(flat.low)
    assert not flat.contains(1.2)
    # paired: differences [-0.05, -0.02]: mean -0.035, sd 0.021213, t = -2.333333, df 1 (Cauchy):
    # p = 1 - (2/pi) atan(2.333333) = 0.257762; CI: -0.035 ± t_{0.975,1} 12.706205 * 0.015 = -0.035 ± 0.190593
    d = paired([1.45, 1.50], [1.50, 1.52])
    assert d.mean == pytest.approx(-0.035) and d.p == pytest.approx(0.257762, abs=1e-5)
    assert (d.low, d.high) == (pytest.approx(-0.225593, abs=1e-5), pytest.approx(0.155593, abs=1e-5))
    assert paired([1.0, math.nan, 2.0], [0.5, 0.5, 1.0]).n == 2  # a seed missing on one side is left out


def test_files_and_plots(results: Path, tmp_path: Path):
    from noble_cli.report.cli import write_report

    rep = load_report(results)
    out = tmp_path / "out"
    written = write_report(rep, out, ["md", "csv"], plots=True)
    csv = pd.read_csv(out / "report.csv")
    for col in ("recipe", "variant", "n", "step_speedup", "step_speedup_std", "param_overhead",
                "step_time_overhead", "wallclock_speedup", "final_eval_loss", "steps_to_target", "target",
                "final_eval_loss_delta", "reached", "p_value", "best_top1"):
        assert col in csv.columns, col
    gelu = csv[csv["variant"] == "gelu r32"].iloc[0]
    assert math.isnan(gelu["step_speedup"]) and gelu["reached"] == "0/2"
    md = (out / "report.md").read_text()
    assert "not reached (< 1.00x)" in md and "## Skipped" in md and "corrupt meta.json" in md and "1/2" in md
    assert "< 1.25x" in md and "1.53x [0.40, 2.66]" in md and "## Headline" in md
    for name in ("tiny_eval_loss_vs_step.png", "tiny_eval_loss_vs_wallclock.png", "tiny_speedup.png"):
        assert (out / name).stat().st_size > 1000 and out / name in written
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(report)

    @app.callback()
    def main() -> None:
        """test app"""

    return app


def test_cli(results: Path):
    runner = CliRunner()
    res = runner.invoke(_app(), ["report", str(results), "--no-plots"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "cosnet r32" in res.output and "not reached" in res.output and "Skipped" in res.output
    assert "vs the baseline" in res.output and "no dense-matched control or init-only control" in res.output
    assert (results / "report" / "report.md").exists() and (results / "report" / "report.csv").exists()
    assert not list((results / "report").glob("*.png"))

    res = runner.invoke(_app(), ["report", str(results), "--format", "md", "--out", str(results / "o2"),
                                 "--no-plots"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and (results / "o2" / "report.md").exists()
    assert not (results / "o2" / "report.csv").exists()

    res = runner.invoke(_app(), ["report", str(results), "--format", "md,html"])
    assert res.exit_code != 0 and isinstance(res.exception, NobleError)
    assert "'html'" in str(res.exception) and "md, csv" in str(res.exception)


def test_cli_empty_folder(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(_app(), ["report", str(tmp_path / "empty")])
    assert res.exit_code != 0 and isinstance(res.exception, NobleError)
    msg = str(res.exception)
    assert "no run folders" in msg and "\n" not in msg
    with pytest.raises(NobleError, match="does not exist"):
        build_report(tmp_path / "nope")


def test_all_skipped_still_writes_report(tmp_path: Path):
    r = tmp_path / "res"
    write_run(r, "running", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1], status="running")
    res = CliRunner().invoke(_app(), ["report", str(r), "--no-plots"])
    assert res.exit_code != 0 and isinstance(res.exception, NobleError) and "no usable runs" in str(res.exception)
    assert "status running" in (r / "report" / "report.md").read_text()


def test_parse_formats():
    assert parse_formats("md, CSV,md") == ["md", "csv"]
    with pytest.raises(NobleError, match="valid: md, csv"):
        parse_formats("pdf")


# --- censoring, timing noise, FLOPs, bpb, controls, labels ------------------------------------------------------------
def test_a_seed_that_never_reaches_gives_a_bound_from_the_budget_and_no_best(tmp_path: Path):
    r = tmp_path / "res"
    for seed in (0, 1):  # the baselines reach their best (3.0) at step 300 of the 400-step budget
        write_run(r, f"b{seed}", variant="baseline", baseline=True, seed=seed, evals=[4.0, 3.5, 3.0, 3.05])
    # seed 0 reaches 3.0 between 200 (3.2) and 300 (2.9): 200 + 100 * 0.2 / 0.3 = 266.67 -> 300 / 266.67 = 1.125
    write_run(r, "v0", variant="cosnet r32", seed=0, evals=[3.9, 3.2, 2.9, 2.8])
    # seed 1 is not at 3.0 by the end of its 400 steps: its speedup is < 300 / 400 = 0.75
    write_run(r, "v1", variant="cosnet r32", seed=1, evals=[3.9, 3.5, 3.2, 3.1])
    for seed in (0, 1):  # never, in either seed: < (0.75 + 0.75) / 2
        write_run(r, f"g{seed}", variant="gelu r32", seed=seed, evals=[4.0, 3.6, 3.3, 3.2], params_total=1040)
    rep = load_report(r)
    cos = row(rep.summary, "cosnet r32")
    # the seed that reached alone would say 1.125x; over both seeds the mean is < (1.125 + 0.75) / 2 = 0.9375
    assert cos["reached"] == "1/2" and math.isnan(cos["step_speedup"])
    assert cos["step_speedup_bound"] == pytest.approx(0.9375)
    # wall-clock alike: seed 0 30 s / 26.67 s = 1.125; seed 1 30 s / its whole 40 s = 0.75
    assert cos["wallclock_speedup_bound"] == pytest.approx(0.9375)
    assert cos["steps_to_target_bound"] == pytest.approx((266.6667 + 400) / 2, abs=1e-3)
    assert not rep.summary["best"].any()
    _, rows, best = display_rows(rep.summary)
    cells = {rw[1]: rw for rw in rows}
    assert "< 0.94x" in cells["cosnet r32"] and "1.12x" not in " ".join(cells["cosnet r32"])
    assert "not reached (< 0.75x)" in cells["gelu r32"] and not any(best)
    (title, lines), = headlines(rep)
    assert "no best variant" in lines[0]
    assert "cosnet r32: step speedup < 0.94x (1/2 seeds reached)" in lines[1]


def test_timing_noise_larger_than_the_effect_is_labelled_noise(tmp_path: Path):
    r = tmp_path / "res"
    ev, fast = [4.0, 3.5, 3.2, 3.1], [3.9, 3.3, 3.0, 2.9]
    # Across the baseline's seeds: median step times 0.10 and 0.13 s: std 0.021213 / mean 0.115 = 0.184463.
    # The variant's: 0.11 and 0.12 s: overheads +10% and -7.69%, mean +1.15%: far inside the noise.
    for seed, (b, v) in enumerate([(0.10, 0.11), (0.13, 0.12)]):
        write_run(r, f"b{seed}", variant="baseline", baseline=True, seed=seed, step_time=b, evals=ev, recipe="shared")
        write_run(r, f"v{seed}", variant="cosnet r32", seed=seed, step_time=v, evals=fast, recipe="shared")
    # Within a run: steps alternating 0.1 / 0.2 s (median 0.12 in summary.json: +20% over the baseline's 0.1).
    # After the warm-up row, sorted 0.1 x4, 0.2 x3: quartiles 0.1, 0.1, 0.2 -> IQR 0.1 / 1.349 / 0.1 = 0.741290.
    # The typical within-run spread of the variants (0.741290) and baselines (0): median 0.370645 > 0.2.
    jitter = [0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1]
    for seed in (0, 1):
        write_run(r, f"jb{seed}", variant="baseline", baseline=True, seed=seed, evals=ev, recipe="jittery")
        write_run(r, f"jv{seed}", variant="cosnet r32", seed=seed, step_time=0.12, step_times=jitter, evals=fast,
                  recipe="jittery")
    # and a clean case: a steady +20% with no noise anywhere is reported
    for seed in (0, 1):
        write_run(r, f"cb{seed}", variant="baseline", baseline=True, seed=seed, evals=ev, recipe="steady")
        write_run(r, f"cv{seed}", variant="cosnet r32", seed=seed, step_time=0.12, evals=fast, recipe="steady")
    # and one seed of the steady case: a single pair cannot tell the branch's cost from a change of load
    write_run(r, "sb0", variant="baseline", baseline=True, evals=ev, recipe="single")
    write_run(r, "sv0", variant="cosnet r32", step_time=0.12, evals=fast, recipe="single")
    rep = load_report(r)
    s = rep.summary.set_index(["recipe", "variant"])
    shared, jittery, steady = s.loc[("shared", "cosnet r32")], s.loc[("jittery", "cosnet r32")], \
        s.loc[("steady", "cosnet r32")]
    single = s.loc[("single", "cosnet r32")]
    assert single["step_time_overhead"] == pytest.approx(0.2) and single["timing_noise"] == 0
    assert single["timing_noisy"]
    assert shared["step_time_overhead"] == pytest.approx(0.011538, abs=1e-6)
    assert shared["timing_noise"] == pytest.approx(0.184463, abs=1e-6) and shared["timing_noisy"]
    assert jittery["step_time_overhead"] == pytest.approx(0.2)
    assert jittery["timing_noise"] == pytest.approx(0.370645, abs=1e-6) and jittery["timing_noisy"]
    assert rep.runs_table.set_index("run_id").loc["jv0", "step_time_spread"] == pytest.approx(0.741290, abs=1e-6)
    assert steady["timing_noise"] == 0 and not steady["timing_noisy"]
    _, rows, _ = display_rows(rep.summary)
    cells = {(rw[0], rw[1]): rw for rw in rows}
    assert cells[("shared", "cosnet r32")].count("noise ±18%") == 2  # wall-clock speedup and step time
    assert cells[("jittery", "cosnet r32")].count("noise ±37%") == 2
    # steady: wall-clock 40 s / (0.12 * 266.67 = 32 s) = 1.25 (seed 0), 40 / (0.12 * 266.67) again (seed 1)
    assert "1.25x" in cells[("steady", "cosnet r32")] and "+20.0%" in cells[("steady", "cosnet r32")]
    assert "100 ms ± 0" in cells[("steady", "baseline")]
    assert cells[("single", "cosnet r32")].count("n/a (1 seed)") == 2
    shared_base = rep.summary[(rep.summary["recipe"] == "shared") & rep.summary["is_baseline"]].iloc[0]
    assert shared_base["median_step_time_s_std"] == pytest.approx(0.021213, abs=1e-6)  # the spread is shown


def test_flops_and_bits_per_byte(tmp_path: Path):
    r = tmp_path / "res"
    ev = [4.0, 3.5, 3.2, 3.1]
    per_step = {"baseline": 1.0e9, "cosnet r32": 1.067e9}
    for seed, (base_bpb, var_bpb) in enumerate([(1.50, 1.45), (1.52, 1.50)]):
        for v, final in ((("baseline", base_bpb)), ("cosnet r32", var_bpb)):
            flops = {"flops_per_step": per_step[v], "flops_per_item": per_step[v] / 512, "flops_item": "tokens"}
            write_run(r, f"{v[:3]}{seed}", variant=v, baseline=v == "baseline", seed=seed, evals=ev,
                      bpb=[2.0, 1.8, 1.6, final], meta_extra=flops)
        write_run(r, f"old{seed}", variant="gelu r32", seed=seed, evals=ev)  # an older folder: no FLOPs, no bpb
    rep = load_report(r)
    cos, gelu = row(rep.summary, "cosnet r32"), row(rep.summary, "gelu r32")
    # +6.7% per step; per token (512 a step): 0.067e9 / 512 = 130859.375
    assert cos["flops_overhead"] == pytest.approx(0.067) and cos["extra_flops_per_step"] == pytest.approx(6.7e7)
    assert cos["extra_flops_per_item"] == pytest.approx(130859.375)
    assert math.isnan(gelu["flops_overhead"])
    # bpb deltas -0.05 and -0.02: mean -0.035 [-0.225593, 0.155593], paired t-test p = 0.257762 (df 1, by hand in
    # test_estimates_against_closed_forms); best bpb 1.45 and 1.50 -> 1.475
    assert cos["final_eval_bpb_delta"] == pytest.approx(-0.035)
    assert cos["final_eval_bpb_delta_ci_low"] == pytest.approx(-0.225593, abs=1e-5)
    assert cos["p_value_bpb"] == pytest.approx(0.257762, abs=1e-5) and cos["best_eval_bpb"] == pytest.approx(1.475)
    headers, rows, _ = display_rows(rep.summary)
    cells = {rw[1]: dict(zip(headers, rw)) for rw in rows}
    assert cells["cosnet r32"]["FLOPs/step"] == "+6.7% (+131k/token)"
    assert cells["baseline"]["FLOPs/step"] == "1G/step" and cells["gelu r32"]["FLOPs/step"] == "-"
    assert cells["cosnet r32"]["Δ bpb [95% CI]"] == "-0.0350 [-0.2256, +0.1556]"
    assert cells["cosnet r32"]["final bpb"] == "1.4750 ± 0.0354"


def test_noble_rows_against_the_dense_matched_and_init_only_controls(tmp_path: Path):
    r = tmp_path / "res"
    curves = {  # seed 0, seed 1
        "baseline": ([4.0, 3.5, 3.2, 3.1], [4.0, 3.6, 3.3, 3.2]),
        "cosnet r32": ([3.9, 3.3, 3.0, 2.9], [3.9, 3.2, 3.0, 2.9]),
        "dense-matched(cosnet r32)": ([4.0, 3.4, 3.1, 3.0], [4.0, 3.4, 3.1, 2.95]),
        "init-only(main-init 0.5)": ([3.9, 3.3, 3.05, 2.95], [3.9, 3.3, 3.05, 2.85]),
    }
    for v, seeds in curves.items():
        for seed, ev in enumerate(seeds):
            # the dense-matched runs are from before meta.json recorded a role: their label says what they are
            extra = {"role": "init"} if v.startswith("init") else {}
            write_run(r, f"{v[:4]}{seed}", variant=v, baseline=v == "baseline", seed=seed, evals=ev, meta_extra=extra)
    rep = load_report(r)
    assert set(rep.runs_table["role"]) == {"baseline", "noble", "dense", "init"}
    c = rep.controls.set_index("reference")
    dense, init = c.loc["dense-matched(cosnet r32)"], c.loc["init-only(main-init 0.5)"]
    # vs dense, target = the dense control's best: seed 0 3.0 at 400, cosnet there at 300 -> 1.333333; seed 1 2.95 at
    # 400, cosnet between 300 (3.0) and 400 (2.9) at 350 -> 1.142857. Mean 1.238095, sd 0.134687,
    # CI 1.238095 ± 12.706205 * 0.134687 / sqrt 2 -> [0.027981, 2.448210]; t = 2.5, p = 1 - (2/pi) atan 2.5 = 0.242238
    assert dense["variant"] == "cosnet r32" and dense["reached"] == "2/2"
    assert dense["step_speedup"] == pytest.approx(1.238095, abs=1e-6)
    assert (dense["step_speedup_ci_low"], dense["step_speedup_ci_high"]) == (
        pytest.approx(0.027981, abs=1e-5), pytest.approx(2.448210, abs=1e-5))
    assert dense["p_value_speedup"] == pytest.approx(0.242238, abs=1e-5)
    # final losses vs dense: -0.1 and -0.05: mean -0.075, p = 1 - (2/pi) atan 3 = 0.204833
    assert dense["final_eval_loss_delta"] == pytest.approx(-0.075) and dense["p_value"] == pytest.approx(0.204833, 1e-4)
    # vs init-only: seed 0 target 2.95, cosnet at 350 -> 1.142857; seed 1 target 2.85 never reached: < 400/400.
    assert init["reached"] == "1/2" and math.isnan(init["step_speedup"])
    assert init["step_speedup_bound"] == pytest.approx((1.142857 + 1.0) / 2, abs=1e-6)
    # vs the baseline the init-only control alone is 1.55x: seed 0 280 steps (1.428571), seed 1 240 (1.666667)
    assert row(rep.summary, "init-only(main-init 0.5)")["step_speedup"] == pytest.approx(1.547619, abs=1e-6)
    (title, lines), = headlines(rep)
    assert lines[0].startswith("vs the baseline (target: each seed's baseline best eval loss): best variant cosnet r32")
    assert any(x.startswith("vs the dense-matched control dense-matched(cosnet r32), cosnet r32: step speedup "
                            "1.24x [0.03, 2.45]") for x in lines)
    assert any(x.startswith("vs the init-only control init-only(main-init 0.5), cosnet r32: step speedup < 1.07x "
                            "(1/2 seeds reached)") for x in lines)
    md = load_report(r)
    from noble_cli.report.render import to_markdown

    text = to_markdown(md)
    assert "## NOBLE vs the dense-matched control" in text and "## NOBLE vs the init-only control" in text


def test_two_variants_that_share_a_label_get_labels_that_tell_them_apart(tmp_path: Path):
    """Folders written before labels named noble.main_init_scale: two CosNet runs both labelled "cosnet r8"."""
    r = tmp_path / "res"
    ev = [4.0, 3.5, 3.2, 3.1]
    write_run(r, "b0", variant="baseline", baseline=True, evals=ev)
    write_run(r, "paper", variant="cosnet r8", variant_key="k-paper", evals=ev,
              noble={"branch": "cosnet", "rank": 8, "main_init_scale": 0.5})
    write_run(r, "own", variant="cosnet r8", variant_key="k-own", evals=ev,
              noble={"branch": "cosnet", "rank": 8, "main_init_scale": None})
    # two more with the same label and no usable config: told apart by their variant keys
    write_run(r, "x1", variant="gelu r8", variant_key="aaaaaa111", evals=ev, noble={"branch": "gelu", "bogus": 1})
    write_run(r, "x2", variant="gelu r8", variant_key="bbbbbb222", evals=ev, noble={"branch": "gelu", "bogus": 2})
    rep = load_report(r)
    labels = set(rep.summary["variant"])
    assert {"cosnet r8", "cosnet r8 own-init"} <= labels
    assert {"gelu r8 (aaaaaa)", "gelu r8 (bbbbbb)"} <= labels


def test_a_report_of_one_sweep_in_a_shared_results_folder(tmp_path: Path):
    """Studies share runs (one baseline trained once) in one results folder; `--sweep` reports one study's."""
    r = tmp_path / "res"
    for rid, v in (("b0", "baseline"), ("c0", "cosnet r32"), ("g0", "gelu r32")):
        write_run(r, rid, variant=v, baseline=v == "baseline", evals=[4.0, 3.5, 3.2, 3.1])
    entry = {"index": 0, "variant": "", "role": "noble", "seed": 0, "status": "done", "config": {}}
    sweep = r / "sweeps" / "study-x"
    sweep.mkdir(parents=True)
    (sweep / "manifest.json").write_text(json.dumps({"name": "study-x", "runs": [
        {**entry, "run_id": rid, "run_dir": f"runs/{rid}"} for rid in ("b0", "c0", "later")]}))
    runs, summary, skipped = build_report(r, sweeps=["study-x"])
    assert set(runs["run_id"]) == {"b0", "c0"} and not skipped  # g0 is another study's; "later" not trained yet
    res = CliRunner().invoke(_app(), ["report", str(r), "--sweep", "study-y", "--no-plots"])
    assert isinstance(res.exception, NobleError)
    assert str(res.exception) == f"no sweep 'study-y' under {r}/sweeps; valid: study-x"


def test_a_recipe_under_two_optimizers_labels_every_row_with_its_optimizer(tmp_path: Path):
    """`noble ablate optimizers`: the AdamW runs keep the labels other studies gave them; the report names the
    optimizer of every row where a recipe's runs mix optimizers, and pairs each NOBLE run with its own baseline."""
    r = tmp_path / "res"
    for optim, pair, base_ev, noble_ev in (("adamw", "pA", [4.0, 3.5, 3.2, 3.1], [3.8, 3.2, 3.0, 2.9]),
                                           ("muon", "pM", [3.6, 3.0, 2.8, 2.7], [3.6, 3.0, 2.8, 2.75])):
        suffix = "" if optim == "adamw" else " | muon"
        for rid, variant, ev, base in ((f"b-{optim}", "baseline", base_ev, True),
                                       (f"c-{optim}", "cosnet r8", noble_ev, False)):
            d = write_run(r, rid, variant=variant + suffix, evals=ev, baseline=base, pair_key=pair)
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            if optim == "muon":
                cfg["optim"]["name"] = "muon"
            (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rep = load_report(r)
    assert set(rep.summary["variant"]) == {"baseline | adamw", "cosnet r8 | adamw", "baseline | muon",
                                           "cosnet r8 | muon"}
    adamw = row(rep.summary, "cosnet r8 | adamw")
    assert adamw["pair_key"] == "pA" and adamw["reached"] == "1/1"
    assert row(rep.summary, "cosnet r8 | muon")["reached"] == "0/1"  # never reaches Muon's baseline
    # the setting is named by the optimizer (the part after the bar of its baseline's label), not a pair hash
    headers, rows, _ = display_rows(rep.summary)
    assert headers[1] == "setting" and {r[1] for r in rows} == {"400 steps, adamw", "400 steps, muon"}
    assert sorted(title.rsplit(" · ", 1)[1] for title, _ in headlines(rep)) == ["adamw", "muon"]
    plots = {p.name for p in make_plots(rep, tmp_path / "plots")}
    assert {"tiny-adamw_eval_loss_vs_step.png", "tiny-muon_speedup.png"} <= plots, plots
    # a setting with only its baseline so far says so (a sweep half done), instead of an empty headline
    write_run(r, "b-lion", variant="baseline | lion", evals=[3.9, 3.4, 3.1, 3.0], baseline=True, pair_key="pL")
    lion = [(title.rsplit(" · ", 1)[1], lines) for title, lines in headlines(load_report(r)) if "lion" in title]
    assert lion == [("lion | adamw", ["only the baseline so far: no variant of this setting to compare it with"])]
    alone = tmp_path / "alone"
    write_run(alone, "b", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1])
    assert set(load_report(alone).summary["variant"]) == {"baseline"}  # one optimizer: labels as they were


def test_an_own_init_run_is_not_paired_with_the_init_only_control(tmp_path: Path):
    """The init-only control is the paper-init CosNet's control (same re-init, no branch). CosNet with the model's
    own init differs from it in init as well as branch: its init control is the baseline, so no row pairs it with
    the init-only run, and its headline does not ask for one."""
    r = tmp_path / "res"
    runs = {  # variant: (evals, noble section, role)
        "baseline": ([4.0, 3.5, 3.2, 3.1], None, None),
        "cosnet r32": ([4.0, 3.6, 3.4, 3.3], {"branch": "cosnet", "rank": 32, "main_init_scale": 0.5}, None),
        "cosnet r32 own-init": ([3.9, 3.3, 3.0, 2.9], {"branch": "cosnet", "rank": 32, "main_init_scale": None},
                                None),
        "init-only(main-init 0.5)": ([4.0, 3.6, 3.5, 3.4], {"branch": "none", "init_only": True,
                                                             "main_init_scale": 0.5}, "init"),
    }
    for v, (ev, noble, role) in runs.items():
        write_run(r, v.replace(" ", "_"), variant=v, baseline=v == "baseline", evals=ev, noble=noble,
                  meta_extra={"role": role} if role else None)
    rep = load_report(r)
    pairs = set(zip(rep.controls["variant"], rep.controls["reference"]))
    assert pairs == {("cosnet r32", "init-only(main-init 0.5)")}
    (title, lines), = headlines(rep)
    assert lines[0].startswith("vs the baseline (target: each seed's baseline best eval loss): best variant "
                               "cosnet r32 own-init")
    # the paper-init arm has its lines too, with its init-only control; the own-init arm asks for no such control
    assert lines[1].startswith("no dense-matched control in this comparison")
    assert lines[2].startswith("vs the baseline, cosnet r32: step speedup not reached")
    assert lines[3].startswith("vs the init-only control init-only(main-init 0.5), cosnet r32: ")
    assert len(lines) == 5 and lines[4].startswith("no dense-matched control in this comparison")


def test_whether_a_setting_changes_a_variant_s_effect_is_one_paired_test(tmp_path: Path):
    """A recipe under two settings (a vision sweep's Mixup/CutMix on and off): per seed, the variant's Δ vs its own
    setting's baseline under each, and their difference paired over seeds, worked out by hand:
    Δ off = [-0.2, -0.2, -0.3], Δ on = [0.0, -0.1, +0.1]; a - b = [-0.2, -0.1, -0.4]: mean -0.2333, sd 0.15275,
    95% CI -0.2333 ± 4.3027 · 0.15275 / sqrt(3) = [-0.6128, +0.1461]; t = -2.6458 with 2 degrees of freedom, whose
    two-sided p is 1 - |t| / sqrt(t^2 + 2) = 1 - 2.6458 / 3 = 0.1181."""
    from noble_cli.report.cells import setting_rows
    from noble_cli.report.headlines import setting_headlines
    from noble_cli.report.render import write_csv
    from noble_cli.report.settings import label_without_setting

    r = tmp_path / "res"
    curves = {
        "mixup off": ([[4.0, 3.5, 3.2, 3.1], [4.0, 3.6, 3.3, 3.2], [4.0, 3.5, 3.2, 3.0]],
                      [[3.9, 3.3, 3.0, 2.9], [3.9, 3.4, 3.1, 3.0], [3.9, 3.2, 2.9, 2.7]]),
        "mixup on": ([[4.2, 3.7, 3.4, 3.3], [4.2, 3.8, 3.5, 3.4], [4.2, 3.7, 3.4, 3.2]],
                     [[4.1, 3.6, 3.4, 3.3]] * 3),  # seed 2 ends at 3.3 > its baseline's 3.2: not reached
    }
    for setting, (bases, nobles) in curves.items():
        pair = setting.replace(" ", "-")
        for seed, (b, n) in enumerate(zip(bases, nobles)):
            write_run(r, f"b-{pair}-{seed}", variant=f"baseline | {setting}", baseline=True, seed=seed, evals=b,
                      pair_key=pair)
            write_run(r, f"c-{pair}-{seed}", variant=f"cosnet r8 | {setting}", seed=seed, evals=n, pair_key=pair,
                      variant_key=f"c-{pair}")
    # a variant under one setting only has nothing to be compared with
    write_run(r, "x-on", variant="gelu r8 | mixup on, extra", seed=0, evals=[4.1, 3.6, 3.4, 3.3],
              pair_key="mixup-on")
    rep = load_report(r)
    (s,) = [row for _, row in rep.settings.iterrows()]
    assert (s["variant"], s["setting_a"], s["setting_b"], s["n"], s["role"]) == ("cosnet r8", "mixup off",
                                                                                 "mixup on", 3, "noble")
    assert s["loss_a"] == pytest.approx(-0.7 / 3) and s["loss_b"] == pytest.approx(0.0, abs=1e-12)
    assert s["loss_diff"] == pytest.approx(-0.7 / 3) and s["loss_diff_std"] == pytest.approx(0.15275, abs=1e-5)
    assert (s["loss_diff_ci_low"], s["loss_diff_ci_high"]) == (pytest.approx(-0.6128, abs=1e-4),
                                                               pytest.approx(0.1461, abs=1e-4))
    assert s["loss_p"] == pytest.approx(1 - math.sqrt(7) / 3, abs=1e-4)
    assert math.isnan(s["speedup_diff"])  # seed 2 under "on" never reached: no speedup to compare
    headers, rows = setting_rows(rep.settings)
    assert rows[0][:7] == ["tiny", "400 steps: mixup off / mixup on", "cosnet r8", "3", "-0.2333 / +0.0000",
                           "-0.2333 [-0.6128, +0.1461]", "0.118"]
    assert "n/a (not every seed reached)" in rows[0] and not any("top-1" in h for h in headers)
    (title, lines), = setting_headlines(rep)
    assert title == "tiny · 400 steps · mixup off vs mixup on: does the setting change the branch's effect?"
    assert lines == ["cosnet r8 (3 seeds under both): final eval loss Δ -0.2333 with mixup off, +0.0000 with mixup "
                     "on; the difference -0.2333 [-0.6128, +0.1461] (p = 0.118: the 95% CI contains 0)"]
    written = write_csv(rep, tmp_path / "out")
    assert (tmp_path / "out" / "settings.csv") in written
    assert pd.read_csv(tmp_path / "out" / "settings.csv")["loss_diff"].iloc[0] == pytest.approx(-0.7 / 3)
    stale = tmp_path / "plots" / "tiny-pairX_speedup.png"  # an earlier report's, of a setting no longer here
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    (tmp_path / "plots" / "notes.png").write_bytes(b"a user's")
    plots = {p.name for p in make_plots(rep, tmp_path / "plots")}
    assert "tiny_settings_mixup-off_vs_mixup-on.png" in plots, plots
    assert not stale.exists() and (tmp_path / "plots" / "notes.png").exists()
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} == plots | {"notes.png"}
    assert label_without_setting("cosnet r8 | muon, branch muon", "muon") == "cosnet r8, branch muon"
    assert label_without_setting("cosnet r8 | mixup on", "mixup off") == "cosnet r8 | mixup on"
    # one setting only: no such table, and no stale settings.csv
    one = tmp_path / "one"
    write_run(one, "b", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1])
    write_run(one, "c", variant="cosnet r8", evals=[3.9, 3.3, 3.0, 2.9])
    (tmp_path / "out" / "report.csv").unlink()
    assert load_report(one).settings.empty
    write_csv(load_report(one), tmp_path / "out")
    assert not (tmp_path / "out" / "settings.csv").exists()


def test_a_settings_test_of_several_variants_gets_q_values(tmp_path: Path):
    """Two variants tested between the same two settings: each a - b p-value comes with its Benjamini-Hochberg q,
    worked out by hand. cosnet: a - b = [-0.2, -0.1, -0.4], p = 0.1181 (the test above). identity: Δ off = [-0.1,
    -0.2, -0.1], Δ on = [0, 0, 0]; a - b mean -0.1333, sd 0.05774, t = -4 with 2 degrees of freedom, p = 1 - 4 /
    sqrt(18) = 0.0572. BH over the two: the larger keeps its p (0.118), the smaller min(2 · 0.0572, 0.118) = 0.114."""
    from noble_cli.report.cells import setting_rows
    from noble_cli.report.headlines import setting_headlines

    r = tmp_path / "res"
    bases = {"mixup off": [[4.0, 3.5, 3.2, 3.1], [4.0, 3.6, 3.3, 3.2], [4.0, 3.5, 3.2, 3.0]],
             "mixup on": [[4.2, 3.7, 3.4, 3.3], [4.2, 3.8, 3.5, 3.4], [4.2, 3.7, 3.4, 3.2]]}
    nobles = {("cosnet r8", "mixup off"): [[3.9, 3.3, 3.0, 2.9], [3.9, 3.4, 3.1, 3.0], [3.9, 3.2, 2.9, 2.7]],
              ("cosnet r8", "mixup on"): [[4.1, 3.6, 3.4, 3.3]] * 3,
              ("identity r8", "mixup off"): [[3.9, 3.4, 3.1, 3.0], [3.9, 3.4, 3.1, 3.0], [3.9, 3.3, 3.0, 2.9]],
              ("identity r8", "mixup on"): [[4.1, 3.6, 3.4, 3.3], [4.1, 3.7, 3.5, 3.4], [4.1, 3.6, 3.3, 3.2]]}
    for setting, curves in bases.items():
        pair = setting.replace(" ", "-")
        for seed, b in enumerate(curves):
            write_run(r, f"b-{pair}-{seed}", variant=f"baseline | {setting}", baseline=True, seed=seed, evals=b,
                      pair_key=pair)
    for (variant, setting), curves in nobles.items():
        pair = setting.replace(" ", "-")
        for seed, n in enumerate(curves):
            write_run(r, f"{variant[:3]}-{pair}-{seed}", variant=f"{variant} | {setting}", seed=seed, evals=n,
                      pair_key=pair, variant_key=f"{variant[:3]}-{pair}")
    rep = load_report(r)
    st = rep.settings.set_index("variant")
    assert st.loc["identity r8", "loss_diff"] == pytest.approx(-0.4 / 3)
    assert st.loc["identity r8", "loss_p"] == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-4)
    assert st.loc["cosnet r8", "loss_q"] == pytest.approx(1 - math.sqrt(7) / 3, abs=1e-4)
    assert st.loc["identity r8", "loss_q"] == pytest.approx(2 * (1 - 4 / math.sqrt(18)), abs=1e-4)
    assert list(st["loss_n_compared"]) == [2, 2]
    _, rows = setting_rows(rep.settings)
    assert {row[2]: row[6] for row in rows} == {"cosnet r8": "0.118 (q 0.118)", "identity r8": "0.057 (q 0.114)"}
    (_, lines), = setting_headlines(rep)
    assert any(line.startswith("identity r8 (3 seeds under both)") and
               "(p = 0.057, q = 0.114 over 2 variants: the 95% CI contains 0)" in line for line in lines), lines


def test_report_md_says_where_and_with_what_the_runs_were_trained(tmp_path: Path):
    from noble_cli.report.cells import provenance_rows
    from noble_cli.report.render import to_markdown

    r = tmp_path / "res"
    versions = {"python": "3.11.7", "torch": "2.14.1+cu130", "lightning": "2.6.6", "triton": "3.8.0"}
    write_run(r, "b", variant="baseline", baseline=True, evals=[4.0, 3.5, 3.2, 3.1], step_time=1.0,
              meta_extra={"versions": versions, "device": "cpu (x86_64, 2 cores)"})  # 400 s of training
    write_run(r, "c", variant="cosnet r8", evals=[3.9, 3.3, 3.0, 2.9], step_time=0.5, created_at="2026-01-03",
              meta_extra={"versions": versions, "device": "1x NVIDIA H200", "git_dirty": True})  # 200 s
    rep = load_report(r)
    headers, rows = provenance_rows(rep.runs)
    assert headers == ["code", "runs", "device", "versions", "created", "training time"]
    assert sorted(rows) == [
        ["abc", "1", "cpu (x86_64, 2 cores)", "python 3.11.7, torch 2.14.1, lightning 2.6.6", "2026-01-01", "6.7 min"],
        ["abc + uncommitted changes", "1", "1x NVIDIA H200", "python 3.11.7, torch 2.14.1, lightning 2.6.6",
         "2026-01-03", "3.3 min"]]
    assert "## Provenance" in to_markdown(rep)


def test_a_masked_lm_s_accuracy_is_reported_like_top_1(tmp_path: Path):
    """The extras registry (report/extras.py): a masked LM's eval_acc gets its best value, paired Δ with CI and p,
    table columns and a headline phrase, as top-1 does, with no code of its own. Best acc by hand: baselines 0.40,
    0.42; CosNet 0.45, 0.46: Δ +0.05, +0.04, mean +0.045 (4.50 pp), sd 0.0070711; df = 1: CI half-width
    12.7062 * 0.0070711 / sqrt 2 = 0.063531; t = 0.045 / 0.005 = 9, p = 1 - (2 / pi) atan 9 = 0.070447."""
    from noble_cli.report.cells import display_rows as rows_of

    r = tmp_path / "res"
    accs = {0: ([0.30, 0.35, 0.40, 0.38], [0.33, 0.40, 0.45, 0.44]),
            1: ([0.31, 0.36, 0.42, 0.41], [0.35, 0.41, 0.46, 0.46])}
    for seed, (b_acc, c_acc) in accs.items():
        write_run(r, f"b{seed}", variant="baseline", baseline=True, seed=seed, evals=[4.0, 3.5, 3.2, 3.1],
                  extra_evals={"eval_acc": b_acc})
        write_run(r, f"c{seed}", variant="cosnet r8", seed=seed, evals=[3.9, 3.3, 3.0, 2.9],
                  extra_evals={"eval_acc": c_acc})
    rep = load_report(r)
    cos = row(rep.summary, "cosnet r8")
    assert cos["best_acc"] == pytest.approx(0.455) and cos["best_acc_delta"] == pytest.approx(0.045)
    assert cos["best_acc_delta_ci_low"] == pytest.approx(0.045 - 0.063531, abs=1e-5)
    assert cos["p_value_acc"] == pytest.approx(0.070447, abs=1e-5)
    headers, rows, _ = rows_of(rep.summary)
    assert headers[-2:] == ["best masked-token acc.", "Δ masked-token acc. [95% CI]"]
    assert {r_[1]: r_[-1] for r_ in rows}["cosnet r8"] == "+4.50 pp [-1.85, +10.85]"
    (_, lines), = headlines(rep)
    assert "masked-token acc. Δ +4.50 pp [-1.85, +10.85]" in lines[0]

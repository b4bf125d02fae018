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
from noble_cli.report.cli import parse_formats, report
from noble_cli.report.figures import steps_to_target
from noble_cli.report.stats import betainc, one_sample_t_test, t_sf_two_sided

STEPS = [100, 200, 300, 400]
PAIR = "pairA"


def write_run(root: Path, run_id: str, *, variant: str, evals: list[float], seed: int = 0, baseline: bool = False,
              recipe: str = "tiny", pair_key: str = PAIR, variant_key: str | None = None, step_time: float = 0.1,
              median: float | None = "same", params_total: int = 1000, status: str = "completed",
              eval_rows_separate: bool = False, top1: list[float] | None = None, created_at: str = "2026-01-01",
              summary: bool = True) -> Path:
    """A run folder per the contract. Training rows every 50 steps with step_time_s = `step_time` (the first row is
    a slow warm-up step of 5 s) and wallclock_s = step_time * step; eval points at STEPS. Eval rows are either in
    the same rows as training (merged) or separate rows with only step, wallclock_s and eval columns."""
    d = root / "runs" / run_id
    d.mkdir(parents=True)
    vkey = variant_key or ("base" if baseline else variant.replace(" ", "_"))
    (d / "config.yaml").write_text(yaml.safe_dump({
        "recipe": recipe, "task": "lm", "seed": seed, "name": run_id, "model": {}, "data": {}, "optim": {"lr": 1e-3},
        "schedule": {}, "trainer": {"max_steps": 400, "batch_size": 8},
        "noble": {"branch": "none" if baseline else variant.split()[0], "rank": 32, "targets": "all",
                  "dense_match": False}}))
    (d / "meta.json").write_text(json.dumps({
        "run_id": run_id, "recipe": recipe, "task": "classify" if top1 else "lm", "variant": variant,
        "variant_key": vkey, "pair_key": pair_key, "seed": seed, "is_baseline": baseline, "max_steps": 400,
        "git_commit": "abc", "git_dirty": False, "versions": {}, "device": "cpu", "params_total": params_total,
        "params_branch": 0 if baseline else params_total - 1000, "created_at": created_at}))
    rows = []
    for s in range(50, 401, 50):
        rows.append({"step": s, "train_loss": 5.0 - s / 200, "step_time_s": 5.0 if s == 50 else step_time,
                     "wallclock_s": step_time * s})
    ev = {s: (loss, (top1[i] if top1 else None)) for i, (s, loss) in enumerate(zip(STEPS, evals))}
    if eval_rows_separate:
        for s, (loss, t1) in ev.items():
            row = {"step": s, "wallclock_s": step_time * s, "eval_loss": loss}
            if top1:
                row["eval_top1"] = t1
            rows.append(row)
    else:
        for row in rows:
            if row["step"] in ev:
                row["eval_loss"] = ev[row["step"]][0]
                if top1:
                    row["eval_top1"] = ev[row["step"]][1]
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
    ev = pd.DataFrame({"step": STEPS, "eval_loss": [3.9, 3.3, 3.0, 2.9]})
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
    _, summary, _ = build_report(results)
    cos = row(summary, "cosnet r32")
    assert cos["n"] == 3 and cos["reached"] == "3/3"
    # speedups: 1.5 (c0), 400/200 = 2.0 (c1: 3.2 reached exactly at 200), 1.090909 (c2)
    # mean = 4.590909 / 3 = 1.530303; deviations -0.030303, 0.469697, -0.439394;
    # squares 0.000918 + 0.220615 + 0.193067 = 0.414600; / 2 = 0.207300; sqrt = 0.455302
    assert cos["step_speedup"] == pytest.approx(1.530303, abs=1e-5)
    assert cos["step_speedup_std"] == pytest.approx(0.455302, abs=1e-5)
    # wall-clock: 40/32 = 1.25, 40/(0.12*200) = 1.666667, 40/(0.12*366.667) = 0.909091 -> mean 1.275253
    assert cos["wallclock_speedup"] == pytest.approx(1.275253, abs=1e-5)
    # final deltas -0.2, -0.15, -0.05: mean -0.133333, sd 0.076376, t = -0.133333 / (0.076376/sqrt 3) = -3.02372
    # df = 2 has a closed form: p = 1 - |t| / sqrt(2 + t^2) = 1 - 3.02372 / 3.33809 = 0.094175
    assert cos["final_eval_loss_delta"] == pytest.approx(-0.133333, abs=1e-5)
    assert cos["final_eval_loss_delta_std"] == pytest.approx(0.076376, abs=1e-5)
    assert cos["p_value"] == pytest.approx(0.094175, abs=1e-4)
    assert cos["param_overhead"] == pytest.approx(0.05)
    assert cos["best"]

    gelu = row(summary, "gelu r32")
    assert gelu["reached"] == "0/2" and math.isnan(gelu["step_speedup"]) and math.isnan(gelu["wallclock_speedup"])
    assert not gelu["best"]

    tanh = row(summary, "tanh r32")  # reached in seed 0 only: mean over reached = 1.5, no std for one value
    assert tanh["reached"] == "1/2" and tanh["step_speedup"] == pytest.approx(1.5)
    assert math.isnan(tanh["step_speedup_std"])

    base = row(summary, "baseline")
    assert base["is_baseline"] and base["n"] == 3 and base["step_speedup"] == 1.0
    assert base["target"] == pytest.approx(3.1)  # (3.1 + 3.2 + 3.0) / 3
    assert summary["variant"].iloc[0] == "baseline"  # baseline first


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


def test_t_distribution_against_known_values():
    assert t_sf_two_sided(2.0, 5) == pytest.approx(0.1019, abs=1e-4)  # t table: two-sided p(t=2, df=5) = 0.1019
    assert t_sf_two_sided(2.228, 10) == pytest.approx(0.05, abs=2e-4)  # t_{0.975, 10} = 2.228
    assert t_sf_two_sided(1.0, 1) == pytest.approx(0.5)  # Cauchy: 1 - (2/pi) atan(1) = 0.5
    assert t_sf_two_sided(1.5, 2) == pytest.approx(1 - 1.5 / math.sqrt(2 + 1.5**2))  # df=2 closed form
    assert t_sf_two_sided(0.0, 7) == pytest.approx(1.0)
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248)  # I_0.4(2,3) = 1 - 0.6^4 - 4*0.4*0.6^3 = 0.5248
    # paired/one-sample: [1,2,3,4] vs 0: mean 2.5, sd 1.290994, t = 2.5 / (1.290994/2) = 3.872983, df 3
    t, p = one_sample_t_test([1, 2, 3, 4])
    assert t == pytest.approx(3.872983, abs=1e-5) and 0.02 < p < 0.05  # t_{0.975,3} = 3.182, t_{0.99,3} = 4.541
    assert math.isnan(one_sample_t_test([1.0])[1])


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
    assert "not reached" in md and "## Skipped" in md and "corrupt meta.json" in md and "1/2" in md
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

"""`noble bench suite`: the CPU dry run of the whole suite (tiny shapes, Triton's interpreter), its streaming, its
budget, the worker pool of the correctness phase, and the plan that forces every autotune config of every kernel.

Nothing here times anything: the dry run only proves that every phase runs end to end and writes its lines.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from typer.testing import CliRunner  # noqa: E402

from noble_cli.bench import bench_app  # noqa: E402
from noble_cli.bench import correctness as K  # noqa: E402
from noble_cli.errors import NobleError  # noqa: E402
from noble_cli.layers.implementation import fused_unavailable_reason, import_noble_kernels  # noqa: E402

runner = CliRunner()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fused = pytest.mark.skipif(fused_unavailable_reason(DEVICE) is not None,
                                 reason=f"fused kernels cannot run on {DEVICE} here")
needs_api = pytest.mark.skipif(not hasattr(import_noble_kernels(), "forced_config"),
                               reason="noble_kernels without autotune_space/forced_config/testing")


def _suite(tmp_path, *args):
    out = tmp_path / "suite"
    result = runner.invoke(bench_app, ["suite", "--tiny", "--out", str(out), "--device", "cpu", *args],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "suite.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in lines] == list(range(1, len(lines) + 1))
    assert all(r["schema"] == 1 and "status" in r and "item" in r for r in lines)
    assert [r["t"] for r in lines] == sorted(r["t"] for r in lines)
    assert lines[0]["phase"] == "env" and lines[-1]["phase"] == "end"
    return out, lines


@needs_fused
@needs_api
def test_dry_run_of_the_whole_suite(tmp_path):
    out, lines = _suite(tmp_path, "--budget", "900", "--workers", "0")
    phases = [r["phase"] for r in lines]
    # every phase, in the order of value, each once in one block
    order = ["env", "plan", "correctness", "micro", "layer", "step", "memory", "tests", "end"]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == order
    env = lines[0]
    assert env["device"] == "cpu" and env["tiny"] and "torch" in env["versions"] and env["budget_s"] == 900
    assert lines[1]["predicted_s_by_phase"].keys() >= {"correctness", "micro", "layer", "step", "tests", "memory"}
    bad = [r for r in lines if r["status"] not in ("ok", "info")]
    assert not bad, bad

    checks = [r for r in lines if r["phase"] == "correctness" and "errors" in r]
    assert {r["dtype"] for r in checks} == {"bfloat16", "float32"}
    for r in checks:  # the output and every gradient, against float64
        assert r["ok"] and r["finite"] and r["max_error"] <= r["tolerance"]
        assert {"y", "x", "weight", "up_weight", "mix_weight", "freq1", "phase2"} <= set(r["errors"])
    assert any(r["forced"] and r["forced"].get("dual_gemm") == 4 for r in checks)  # a forced, non-default config
    assert any(r["forced"] is None for r in checks)  # and the autotuner's pick
    selfcheck = next(r for r in lines if r["item"].startswith("noble train's self-check"))
    assert selfcheck["ok"] and selfcheck["shapes"]
    coverage = next(r for r in lines if r["item"] == "coverage")
    assert 4 in coverage["bf16"]["covered"]["dual_gemm"]  # read off the launches, not assumed

    micro = [r for r in lines if r["phase"] == "micro"]
    assert {r["impl"] for r in micro} == {"cublas", "torch", "triton"}
    assert any(r["options"] for r in micro)  # a design switch, side by side with the defaults
    assert all(r["ms"] > 0 and r["flops"] > 0 for r in micro)
    layer = {r["variant"]: r for r in lines if r["phase"] == "layer"}
    assert layer.keys() == {"baseline", "noble-torch", "noble-triton"} and layer["noble-triton"]["overhead"] is not None
    step = {r["variant"]: r for r in lines if r["phase"] == "step"}
    assert step["noble-triton"]["flop_overhead"] > 0 and step["baseline"]["params"] < step["noble-triton"]["params"]
    tests = next(r for r in lines if r["phase"] == "tests")
    assert tests["counts"].get("tests collected", 0) >= 1 and (out / tests["log"]).exists()
    memory = next(r for r in lines if r["phase"] == "memory")
    assert memory["activation_checkpointing"] is True
    end = lines[-1]
    assert end["by_phase"]["correctness"]["items"] == len([r for r in lines if r["phase"] == "correctness"])


def test_a_budget_too_small_skips_every_item_and_says_why(tmp_path):
    _, lines = _suite(tmp_path, "--budget", "1", "--workers", "0")
    items = [r for r in lines if r["phase"] not in ("env", "plan", "end") and r["status"] != "info"]
    assert items and all(r["status"] == "skipped" for r in items)
    budget = [r for r in items if r["reason"].startswith("budget: needs ~")]
    assert {r["phase"] for r in budget} >= {"micro", "layer", "step", "tests", "memory"}


def test_refusals_are_one_line_errors(tmp_path):
    (tmp_path / "suite.jsonl").write_text("")
    for args, message in ((["--tiny"], "exists: give another --out"), ([], "the full suite needs a CUDA GPU"),
                          (["--tiny", "--phases", "micro,nope"], "unknown phase 'nope'; valid: correctness")):
        if DEVICE == "cuda" and not args:
            continue
        result = runner.invoke(bench_app, ["suite", "--out", str(tmp_path), "--device", "cpu", *args])
        assert isinstance(result.exception, NobleError) and message in str(result.exception)


@needs_api
def test_the_plan_forces_every_config_of_every_kernel():
    """Full mode, planned (not run): over the forced items, every config index of every kernel, per element size,
    under option sets that launch that kernel; then the full shapes with the autotuner's pick."""
    nk = import_noble_kernels()
    items = K.plan_items(K.FULL, False, {k: 1.0 for k in ("forced_bf16", "full_bf16", "ragged_bf16", "selfcheck",
                                                          "forced_fp32", "full_fp32", "ragged_fp32")})
    for dt in ("bf16", "fp32"):
        space = nk.autotune_space(K.ELEM_BYTES[dt])
        forced = [it for it in items if it["group"] == f"forced-{dt}"]
        covered = {(k, i) for it in forced for k, i in it["forced"].items() if k in K.reached_by(nk, it["options"])}
        assert covered == {(k, i) for k, configs in space.items() for i in range(len(configs))}
        assert all(it["shape"] == {**vars(K.FULL.forced)} for it in forced)
        full = [it for it in items if it["group"] == f"full-{dt}"]
        assert full and all(it["forced"] is None for it in full)
        assert {it["shape"]["name"] for it in full} == {"qkvo", "fc", "fc2"}
    # what training runs comes first
    assert items[0]["dtype"] == "bf16" and items[0]["options"] == {}


@needs_fused
@needs_api
def test_the_pool_runs_items_in_a_worker_and_cuts_what_is_left(tmp_path):
    import time

    items = K.plan_items(K.TINY, True, {k: 0.1 for k in ("forced_bf16", "full_bf16", "ragged_bf16", "selfcheck",
                                                         "forced_fp32", "full_fp32", "ragged_fp32")})
    ragged = [dict(it) for it in items if it["group"].startswith("ragged")][:1]
    rest = [dict(it) for it in items if it["group"].startswith("forced")][:1]
    pool = K.Pool(1, DEVICE)
    try:
        pool.submit(ragged)
        got = list(pool.results(time.monotonic() + 300))
        assert len(got) == 1 and got[0]["status"] == "ok" and got[0]["pid"] != os.getpid()
        pool.submit(rest)
    finally:
        left = pool.close("the test ended")
    assert [r["item"] for r in left] == [rest[0]["item"]]
    assert left[0]["status"] in ("ok", "cut", "skipped")  # finished while closing, cut, or never started


def test_a_dead_worker_turns_its_item_into_an_error_and_stops_the_rest():
    """A kernel that crashes its process: that item is an error naming the worker, and the items left are not run
    in the suite's own process (they would crash it too)."""
    import types

    pool = K.Pool(0, "cpu")
    items = [{"id": i, "item": f"item {i}", "group": "g", "predicted_s": 1.0} for i in range(3)]
    pool.submit(items)
    pool.procs = [types.SimpleNamespace(pid=101, exitcode=-11, is_alive=lambda: False)]
    pool.started, pool.ran_any = {0: 101}, True
    crashed = list(pool._crashed())
    assert [r["item"] for r in crashed] == ["item 0"] and "101 died (exit code -11)" in crashed[0]["error"]
    assert list(pool.results(float("inf"))) == []
    left = pool.close("the end")
    assert [(r["item"], r["status"]) for r in left] == [("item 1", "skipped"), ("item 2", "skipped")]
    assert "every worker process died" in left[0]["reason"]

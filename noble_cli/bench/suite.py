"""`noble bench suite`: the whole GPU verdict in one command, streamed, within a time budget.

    noble bench suite --out DIR --budget 540

Phases, in order of value (docs/kernels.md, "Measure on a GPU"): the environment; kernel correctness (every
autotune config of every kernel forced once at a small shape, the llm-250m layer shapes with the autotuner's pick,
a ragged shape, bf16 autocast and fp32, against float64; `noble train`'s self-check); kernel micro-timings against
cuBLAS and every design switch side by side; the layer table (eager); the compiled llm-250m training step; then, as
time allows, llm-1.5b's step memory with activation checkpointing (a figure nothing else measures) and the
`gpu`-marked tests (which mostly repeat what the correctness phase covers).

Every result is one JSON line in DIR/suite.jsonl, written (flushed, fsynced) the moment it exists. Before each item
the suite predicts its cost (a table of predictions, scaled by how the items of its kind have run so far) and skips
what cannot finish within the budget, recording the skip as a line too; a run cut off anyway keeps every line
written before the cut. `--tiny` is the CPU dry run (tiny shapes, Triton's interpreter) that the test suite runs so
that this command cannot rot.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape

from noble_cli.bench import correctness as K
from noble_cli.bench.common import JsonLines, device_name, error_text, reset_memory
from noble_cli.errors import NobleError
from noble_cli.layers.implementation import fused_unavailable_reason, import_noble_kernels

console = Console()
SCHEMA = 1
PHASES = ("correctness", "micro", "layer", "step", "memory", "tests")
RESERVE_S = 3.0  # kept for the closing line

# Predicted seconds per item on an H100/H200 host with 16 cores and a cold Triton cache (docs/kernels.md's table
# sums them). Correctness items are worker time (they run in parallel); the rest is wall time.
COSTS = {
    "env": 2, "pool_start": 15,
    "forced_bf16": 15, "full_bf16": 8, "ragged_bf16": 12, "selfcheck": 5,
    "forced_fp32": 35, "full_fp32": 10, "ragged_fp32": 30,
    "micro_setup": 3, "micro_item": 0.6, "layer_row": 3,
    "step_baseline": 60, "step_noble-triton": 75, "step_noble-torch": 75,
    "tests": 90, "memory_noble-triton": 40, "memory_baseline": 35,
}
TINY_COSTS = {k: (v / 50 if k != "pool_start" else 5) for k, v in COSTS.items()}
TINY_STEP_SETS = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.vocab_size=256",
                  "model.block_size=16", "data.seq_len=16", "trainer.batch_size=1", "noble.rank=4",
                  "noble.targets=blocks.0.mlp.fc"]


class Suite:
    """The budget, the output stream and the console, shared by the phases."""

    def __init__(self, out: Path, budget: float, tiny: bool, dev: torch.device, workers: int):
        self.t0 = time.monotonic()
        self.budget, self.tiny, self.dev, self.workers = budget, tiny, dev, workers
        self.costs = TINY_COSTS if tiny else COSTS
        self.stream = JsonLines(out / "suite.jsonl")
        self.out = out
        self.seq = 0
        self.factor: dict[str, list[float]] = {}  # kind -> [actual total, predicted total]
        self.phase_time: dict[str, dict] = {}
        self.phase_seconds: dict[str, float] = {}

    def timed(self, phase: str, fn, *args, **kwargs) -> None:
        """Runs a phase, adding its wall time to the closing line's figures."""
        t0 = time.monotonic()
        try:
            fn(self, *args, **kwargs)
        finally:
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + time.monotonic() - t0

    # --- time -----------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return self.budget - self.elapsed() - RESERVE_S

    def predict(self, kind: str, predicted: float) -> float:
        """`predicted` scaled by how the items of this kind ran so far (never below the table's figure / 2)."""
        actual, pred = self.factor.get(kind, (0.0, 0.0))
        return predicted * (max(0.5, actual / pred) if pred > 0 else 1.0)

    def learn(self, kind: str, predicted: float, actual: float) -> None:
        a, p = self.factor.get(kind, (0.0, 0.0))
        self.factor[kind] = [a + actual, p + predicted]

    # --- output -----------------------------------------------------------------------------------------------
    def emit(self, record: dict) -> dict:
        self.seq += 1
        record = {"schema": SCHEMA, "seq": self.seq, "t": round(self.elapsed(), 3), **record}
        record.setdefault("status", "ok")
        record = self.stream.write(record)
        phase = record.get("phase", "")
        stats = self.phase_time.setdefault(phase, {"items": 0, "skipped": 0, "failed": 0, "predicted_s": 0.0})
        stats["items"] += 1
        stats["skipped"] += record["status"] in ("skipped", "cut")
        stats["failed"] += record["status"] in ("fail", "error")
        if record["status"] not in ("skipped", "cut"):
            stats["predicted_s"] += float(record.get("predicted_s") or 0)
        self._print(record)
        return record

    def _print(self, r: dict) -> None:
        status = r["status"]
        color = {"ok": "green", "fail": "red", "error": "red", "skipped": "yellow", "cut": "yellow"}.get(status, "dim")
        detail = ""
        if r.get("ms") is not None:
            detail = f"{r['ms']:.3f} ms"
            if r.get("tflops") is not None:
                detail += f", {r['tflops']:.0f} TFLOP/s, {r['gbps']:.0f} GB/s"
            if r.get("overhead") is not None:
                detail += f", overhead {r['overhead']:+.1%}"
        elif r.get("max_error") is not None:
            detail = f"max rel. error {r['max_error']:.2e} ({r.get('worst')}), tolerance {r.get('tolerance'):.1e}"
        why = r.get("reason") or r.get("error") or r.get("skipped") or ""
        console.print(f"[dim]{r['t']:7.1f}s[/] {escape(str(r.get('phase')))}: {escape(str(r.get('item')))} "
                      f"[{color}]{status}[/] {escape(detail)} {escape(str(why))}", highlight=False, soft_wrap=True)

    def skip(self, phase: str, item: str, reason: str, predicted: float | None = None) -> None:
        self.emit({"phase": phase, "item": item, "status": "skipped", "reason": reason, "predicted_s": predicted})

    def fits(self, phase: str, item: str, kind: str, predicted: float) -> bool:
        """Whether an item predicted to take `predicted` s (scaled by `kind`) fits what is left; if not, its skip
        is recorded."""
        need = self.predict(kind, predicted)
        if need <= self.left():
            return True
        self.skip(phase, item, f"budget: needs ~{need:.0f} s, {max(0.0, self.left()):.0f} s left", predicted)
        return False

    def run(self, phase: str, item: str, kind: str, predicted: float, fn) -> dict | None:
        """fn() -> record fields, if the item fits; records it (or its error) with its time."""
        if not self.fits(phase, item, kind, predicted):
            return None
        t0 = time.monotonic()
        try:
            fields = fn()
        except NobleError:
            raise
        except Exception as e:
            fields = {"status": "error", "error": error_text(e)}
        seconds = time.monotonic() - t0
        self.learn(kind, predicted, seconds)
        return self.emit({"phase": phase, "item": item, **fields, "seconds": round(seconds, 3),
                          "predicted_s": predicted})


# ---------------------------------------------------------------------------------------------------------------
# Phase 1: the environment

def _nvidia_smi() -> dict:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                              "clocks.max.mem,power.limit", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    keys = ("name", "driver", "memory", "max_sm_clock", "max_mem_clock", "power_limit")
    return dict(zip(keys, [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]))


def environment(suite: Suite, argv: list[str]) -> dict:
    from noble_cli.train.run_folder import git_state, library_versions

    commit, dirty = git_state()
    rec = {"phase": "env", "item": "environment", "device": device_name(suite.dev), "versions": library_versions(),
           "git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_count": os.cpu_count(), "budget_s": suite.budget,
           "workers": suite.workers, "tiny": suite.tiny, "command": shlex.join(argv),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "env": {k: v for k, v in os.environ.items() if k.startswith(("TRITON_", "NOBLE_KERNELS", "CUDA_VISIBLE"))},
           "fused": fused_unavailable_reason(suite.dev) or "available"}
    if suite.dev.type == "cuda":
        p = torch.cuda.get_device_properties(suite.dev)
        rec.update(capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2**30, 1), l2_mb=getattr(p, "L2_cache_size", 0) / 2**20,
                   nvidia_smi=_nvidia_smi())
        from noble_cli.train.recorder import peak_flops

        rec["peak_bf16_tflops"] = (peak_flops() or 0) / 1e12 or None
    return rec


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: correctness

def correctness_phase(suite: Suite, later_reserve: float) -> None:
    shapes = K.TINY if suite.tiny else K.FULL
    why = fused_unavailable_reason(suite.dev)
    if why:
        suite.skip("correctness", "all", why)
        return
    try:
        items = K.plan_items(shapes, suite.tiny, suite.costs)
    except Exception as e:
        suite.emit({"phase": "correctness", "item": "plan", "status": "error", "error": error_text(e)})
        return
    work = sum(it["predicted_s"] for it in items)
    wall = suite.costs["pool_start"] * bool(suite.workers) + work / max(1, suite.workers)
    # the phase may take twice its prediction, but not the time the next, more valuable phases need
    allowed = max(min(2 * wall, suite.left() - later_reserve), min(30.0, suite.left()))
    suite.emit({"phase": "correctness", "item": "plan", "status": "info", "items": len(items),
                "predicted_work_s": round(work, 1), "predicted_s": round(wall, 1), "allowed_s": round(allowed, 1),
                "workers": suite.workers, "shapes": [dataclasses.asdict(s) for s in (*shapes.full, shapes.ragged,
                                                                                     shapes.forced)]})
    if allowed < min(it["predicted_s"] for it in items):  # nothing would finish: no workers to start
        for it in items:
            suite.skip("correctness", it["item"], f"budget: {max(0.0, suite.left()):.0f} s left", it["predicted_s"])
        return
    deadline = time.monotonic() + allowed
    t0 = time.monotonic()
    pool = K.Pool(suite.workers, str(suite.dev))
    records = []
    try:
        pool.submit(items)
        for rec in pool.results(deadline):
            records.append(suite.emit(rec))
    finally:
        for rec in pool.close("the correctness phase's time was up"):
            suite.emit(rec)
    suite.learn("pool", wall, time.monotonic() - t0)
    try:
        suite.emit({"phase": "correctness", "item": "coverage", "status": "info",
                    **K.coverage(import_noble_kernels(), records)})
    except Exception as e:
        suite.emit({"phase": "correctness", "item": "coverage", "status": "error", "error": error_text(e)})


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: micro-timings

def micro_phase(suite: Suite) -> None:
    from noble_cli.bench import micro as M

    # the dry run: one shape of a tile or two (the interpreter's time grows with the programs launched)
    shapes = (K.Shape("qkvo", 32, 16, 16, 4),) if suite.tiny else K.FULL.full
    why = fused_unavailable_reason(suite.dev)
    if why:
        suite.skip("micro", "all", why)
        return
    for s, gen in M.micro_plan(shapes, suite.dev, switches=1 if suite.tiny else None):
        if not suite.fits("micro", f"{s.name} items", "gpu", suite.costs["micro_setup"]):
            continue
        for m in M.safe_items(gen, s):
            if isinstance(m, dict):
                suite.emit(m)
                break
            if not suite.fits("micro", f"{s.name} {m.label}", "gpu", suite.costs["micro_item"]):
                continue
            t0 = time.monotonic()
            rec = M.run_micro(m, suite.dev, s)
            rec["seconds"] = round(time.monotonic() - t0, 3)
            rec["predicted_s"] = suite.costs["micro_item"]
            suite.learn("gpu", suite.costs["micro_item"], rec["seconds"])
            suite.emit(rec)
        reset_memory(suite.dev)


# ---------------------------------------------------------------------------------------------------------------
# Phase 4: the layer table

def layer_phase(suite: Suite) -> None:
    from noble_cli.bench.layer import layer_rows

    if suite.tiny:
        shape_list, tokens, rank, warmup, iters = [("qkvo", 32, 32)], 64, 8, 0, 1
    else:
        shape_list, tokens, rank, warmup, iters = [("qkvo", 1024, 1024), ("fc", 1024, 4096), ("fc2", 4096, 1024)], \
            16384, 64, 5, 20
    prec = "bf16-mixed" if suite.dev.type == "cuda" else "32"
    for shape in shape_list:
        if not suite.fits("layer", f"{shape[0]} {shape[1]}->{shape[2]}", "gpu", 3 * suite.costs["layer_row"]):
            continue
        for row in layer_rows([shape], [rank], ["baseline", "noble-torch", "noble-triton"], ["eager"], tokens,
                              suite.dev, prec, warmup, iters, seed=0):
            status = "ok" if row["ms"] is not None else ("error" if (row["skipped"] or "").startswith("error")
                                                          else "skipped")
            suite.emit({"phase": "layer", "item": f"{row['shape']} {row['in']}->{row['out']} {row['variant']}",
                        "status": status, "precision": prec, **row, "predicted_s": suite.costs["layer_row"]})


# ---------------------------------------------------------------------------------------------------------------
# Phases 5 and 6a: training steps (llm-250m compiled; llm-1.5b's memory)

def _step_cfg(suite: Suite, recipe: str, variants: list[str], extra_sets: list[str]):
    from noble_cli.bench.step import step_config

    if suite.tiny:
        return step_config("llm-tiny", "cosnet", {}, TINY_STEP_SETS + extra_sets, variants)
    return step_config(recipe, "cosnet", {}, extra_sets, variants)


def step_phase(suite: Suite, phase: str, recipe: str, variants: list[str], compiled: bool, warmup: int,
               iters: int, extra_sets: list[str] = ()) -> None:
    from noble_cli.bench.step import step_rows

    cfg, branch = _step_cfg(suite, recipe, variants, list(extra_sets))
    prec = "bf16-mixed" if suite.dev.type == "cuda" else "32"
    mode = "compiled" if compiled and not suite.tiny else "eager"  # the CPU dry run never compiles
    base = None
    for variant in variants:
        key = f"{'step' if phase == 'step' else 'memory'}_{variant}"
        item = f"{cfg.recipe} {variant} {mode}"
        if not suite.fits(phase, item, "inductor" if mode == "compiled" else "gpu", suite.costs[key]):
            continue
        t0 = time.monotonic()
        row = next(step_rows(cfg, branch, [variant], [mode], suite.dev, prec, warmup, iters))
        seconds = time.monotonic() - t0
        suite.learn("inductor" if mode == "compiled" else "gpu", suite.costs[key], seconds)
        if variant == "baseline":
            base = row
        elif base and base["ms"] and row["ms"]:
            row["overhead"] = row["ms"] / base["ms"] - 1
            if base["flops_per_step"] and row["flops_per_step"]:
                row["flop_overhead"] = row["flops_per_step"] / base["flops_per_step"] - 1
        status = "ok" if row["ms"] is not None else ("error" if (row["skipped"] or "").startswith("error")
                                                      else "skipped")
        suite.emit({"phase": phase, "item": item, "status": status, "recipe": cfg.recipe, "precision": prec,
                    "batch_size": cfg.trainer.batch_size, "seq_len": getattr(cfg.data, "seq_len", None),
                    "activation_checkpointing": cfg.trainer.activation_checkpointing, **row,
                    "seconds": round(seconds, 3), "predicted_s": suite.costs[key]})


# ---------------------------------------------------------------------------------------------------------------
# Phase 6b: the gpu-marked tests

def _gpu_test_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if re.search(r"pytest\.mark\.gpu|^gpu\s*=", p.read_text(), re.M))


def tests_phase(suite: Suite) -> None:
    root = Path(__file__).resolve().parents[2]
    files = _gpu_test_files(root) if (root / "tests").is_dir() else []
    if not files:
        suite.skip("tests", "gpu-marked tests", "no tests/ folder with gpu-marked tests beside this noble_cli")
        return
    if not suite.fits("tests", "gpu-marked tests", "pytest", suite.costs["tests"]):
        return
    # autotuning off: the tests' odd shapes would otherwise compile every config again (one each suffices here)
    env = dict(os.environ, NOBLE_KERNELS_AUTOTUNE="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rfEs", *files]
    if suite.tiny or suite.dev.type != "cuda":
        cmd.append("--collect-only")  # the dry run checks the command, not tests that need a GPU
    log = suite.out / "gpu-tests.log"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=max(10.0, suite.left()))
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        code = "timeout"
    log.write_text(output)
    seconds = time.monotonic() - t0
    suite.learn("pytest", suite.costs["tests"], seconds)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected|selected|"
                                                r"tests? collected)", output)}
    ok = code == 0 or (code == 5 and "collect-only" in cmd)
    suite.emit({"phase": "tests", "item": "gpu-marked tests", "status": "ok" if ok else "fail", "returncode": code,
                "counts": counts, "command": shlex.join(cmd), "log": log.name, "tail": output[-2000:],
                "seconds": round(seconds, 3), "predicted_s": suite.costs["tests"]})


# ---------------------------------------------------------------------------------------------------------------
# The command

def predicted_phases(costs: dict, workers: int, tiny: bool) -> dict:
    """The table docs/kernels.md shows: predicted seconds per phase (full mode)."""
    n_forced = 10  # 2 option sets x 5 configs (the GEMMs' count), per element size
    work = (n_forced * (costs["forced_bf16"] + costs["forced_fp32"]) + 6 * costs["full_bf16"] + costs["selfcheck"]
            + 2 * costs["ragged_bf16"] + 3 * costs["full_fp32"] + costs["ragged_fp32"])
    shapes = 1 if tiny else 3
    return {
        "env": costs["env"],
        "correctness": costs["pool_start"] * bool(workers) + work / max(1, workers),
        "micro": shapes * (2 * costs["micro_setup"] + 25 * costs["micro_item"]),
        "layer": shapes * 3 * costs["layer_row"],
        "step": costs["step_baseline"] + costs["step_noble-triton"] + costs["step_noble-torch"],
        "tests": costs["tests"],
        "memory": costs["memory_noble-triton"] + costs["memory_baseline"],
    }


def default_workers() -> int:
    return max(1, min(12, (os.cpu_count() or 2) - 2))


def suite(
    out: Path = typer.Option(..., help="Folder for suite.jsonl (one JSON line per result) and gpu-tests.log."),
    budget: float = typer.Option(540, min=1, help="Seconds for the whole suite, Triton compiles included; items "
                                                  "that cannot finish in what is left are skipped (and recorded)."),
    workers: Optional[int] = typer.Option(None, min=0, help="Processes for the correctness checks (Triton compiles "
                                                             "run in parallel); 0: in this process. Default: CPU "
                                                             "cores - 2, at most 12 (on a CPU: 0)."),
    phases: str = typer.Option(",".join(PHASES), help=f"Comma-separated subset of {', '.join(PHASES)} (the "
                                                     "environment line always comes first)."),
    tiny: bool = typer.Option(False, "--tiny", help="The CPU dry run: tiny shapes and models, Triton's interpreter "
                                                    "(set TRITON_INTERPRET=1), nothing compiled; times mean nothing."),
    device: str = typer.Option("auto", help="auto | cuda | cpu."),
):
    """The whole GPU verdict in one command: environment, kernel correctness, micro-timings, layer table, compiled
    llm-250m step, then (as time allows) llm-1.5b's step memory and the gpu-marked tests — each result a JSON line
    in OUT/suite.jsonl the moment it exists."""
    from noble_cli.bench.common import csv_items, device_of

    dev = device_of(device)
    wanted = csv_items(phases, "phases", PHASES)
    if dev.type != "cuda" and not tiny:
        raise NobleError("the full suite needs a CUDA GPU; on a CPU run the dry run: TRITON_INTERPRET=1 noble bench "
                         "suite --tiny --out DIR")
    path = out / "suite.jsonl"
    if path.exists():
        raise NobleError(f"{path} exists: give another --out (the suite appends to nothing it did not start)")
    if workers is None:
        workers = default_workers() if dev.type == "cuda" else 0
    s = Suite(out, budget, tiny, dev, workers)
    costs = s.costs
    predicted = predicted_phases(costs, workers, tiny)
    s.emit({**environment(s, sys.argv), "predicted_s": costs["env"]})
    s.emit({"phase": "plan", "item": "phases", "status": "info", "phases": [p for p in PHASES if p in wanted],
            "predicted_s_by_phase": {p: round(v, 1) for p, v in predicted.items()},
            "predicted_total_s": round(sum(v for p, v in predicted.items() if p in wanted or p == "env"), 1)})
    try:
        if "correctness" in wanted:
            # what the phases after it need before the ones that come "as time allows"
            later = sum(predicted[p] for p in ("micro", "layer") if p in wanted) + (
                costs["step_baseline"] + costs["step_noble-triton"] if "step" in wanted else 0)
            s.timed("correctness", correctness_phase, later)
        if "micro" in wanted:
            s.timed("micro", micro_phase)
        if "layer" in wanted:
            s.timed("layer", layer_phase)
        if "step" in wanted:
            # by value: the baseline (MFU), the fused branch (the overhead), then the torch branch (known: +115%)
            # (the dry run leaves out the torch branch: the same code path as the baseline's, with a branch)
            variants = ["baseline", "noble-triton"] + ([] if tiny else ["noble-torch"])
            s.timed("step", step_phase, "step", "llm-250m", variants, compiled=True, warmup=0 if tiny else 3,
                    iters=1 if tiny else 10)
        if "memory" in wanted:
            # the fused branch first: whether llm-1.5b with NOBLE fits one 80 GB card is the figure wanted
            s.timed("memory", step_phase, "memory", "llm-1.5b", ["noble-triton"] + ([] if tiny else ["baseline"]),
                    compiled=False, warmup=0, iters=1 if tiny else 2,
                    extra_sets=["trainer.activation_checkpointing=true"])
        if "tests" in wanted:
            s.timed("tests", tests_phase)
    finally:
        by_phase = {p: {**v, "actual_s": round(s.phase_seconds.get(p, 0.0), 1),
                        "predicted_phase_s": round(predicted.get(p, 0.0), 1)}
                    for p, v in s.phase_time.items() if p in predicted}
        s.emit({"phase": "end", "item": "summary", "status": "info", "elapsed_s": round(s.elapsed(), 1),
                "budget_s": budget, "by_phase": by_phase,
                "calibration": {k: round(a / p, 2) for k, (a, p) in s.factor.items() if p}})
        s.stream.close()
    console.print(f"wrote {path}")

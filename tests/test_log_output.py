"""Output read in log files (nohup, SLURM, CI): no terminal means full-width tables, plain sweep overviews, and a
progress line every few seconds instead of a redrawn bar; a terminal keeps rich's bar and panels."""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from types import SimpleNamespace

import pandas as pd
import pytest
from rich.console import Console

from noble_cli.console import LOG_WIDTH, make_console, progress_seconds
from noble_cli.errors import NobleError
from noble_cli.sweep import grids
from noble_cli.train.run import LogProgress, StepProgressBar, progress_callback

LINE = re.compile(r"^train step (\d+)/4 \((\d+)%\)  loss (\d+\.\d{4})  tokens/s \d+(\.\d)?k?  elapsed \d+s"
                  r"(  ETA \d+s)?$")


def test_a_log_gets_a_progress_line_per_interval_and_a_line_per_evaluation(tracked_run):
    out = tracked_run.stdout
    assert "\r" not in out and "\x1b[" not in out  # no redraws, no colour codes
    lines = out.strip().splitlines()
    train = [LINE.match(line) for line in lines if line.startswith("train step")]
    assert all(train), lines
    metrics = pd.read_csv(tracked_run.result.run_dir / "metrics.csv").set_index("step")
    # $NOBLE_PROGRESS_SECONDS=0: a line at every step, with the loss metrics.csv holds; ETA until the last step
    assert [int(m.group(1)) for m in train] == [1, 2, 3, 4]
    assert [float(m.group(3)) for m in train] == pytest.approx(metrics["train_loss"].tolist(), abs=1e-4)
    assert [bool(m.group(5)) for m in train] == [True, True, True, False]
    evals = [line for line in lines if line.startswith("eval")]
    assert len(evals) == 2
    for line, s in zip(evals, (2, 4)):  # every eval metric metrics.csv holds for that step
        assert line.startswith(f"eval  step {s}/4  eval_loss {metrics.loc[s, 'eval_loss']:.4f}")
        assert f"eval_bpb {metrics.loc[s, 'eval_bpb']:.4f}" in line


def fake_trainer(step: int, total: int = 1000):
    return SimpleNamespace(global_step=step, max_steps=total, sanity_checking=False)


def test_progress_lines_come_every_interval_not_every_step(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("noble_cli.train.run.time.monotonic", lambda: clock[0])
    rows = {}
    buf = io.StringIO()
    bar = LogProgress(SimpleNamespace(rows=rows), make_console(file=buf), every_s=30)
    bar.on_train_start(fake_trainer(0), None)
    for step in range(1, 1001):  # a step every 0.5 s, 1000 tokens each
        clock[0] = step * 0.5
        rows[step] = {"step": step, "train_loss": 5 - step / 1000, "step_time_s": 0.5, "tokens_per_s": 2000.0}
        bar.on_train_batch_end(fake_trainer(step), None, None, None, step - 1)
    lines = buf.getvalue().splitlines()
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == [1] + list(range(61, 1000, 60)) + [1000]  # the first step, every 30 s, and the last
    assert lines[1] == "train step 61/1000 (6%)  loss 4.9390  tokens/s 2.0k  elapsed 30s  ETA 7m50s"


def test_the_progress_display_follows_the_terminal():
    recorder = SimpleNamespace(rows={})
    assert isinstance(progress_callback(recorder, Console(file=io.StringIO(), force_terminal=True)), StepProgressBar)
    assert isinstance(progress_callback(recorder, make_console(file=io.StringIO())), LogProgress)


def test_console_width_in_a_log_and_on_a_terminal(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    assert make_console(file=io.StringIO()).width == LOG_WIDTH
    assert make_console(file=io.StringIO(), force_terminal=True).width != LOG_WIDTH  # a terminal: as rich sizes it
    monkeypatch.setenv("COLUMNS", "132")  # the user's choice wins
    assert make_console(file=io.StringIO()).width == 132
    monkeypatch.setenv("NOBLE_PROGRESS_SECONDS", "soon")
    with pytest.raises(NobleError, match=r"NOBLE_PROGRESS_SECONDS must be a number of seconds, got 'soon'"):
        progress_seconds()


def _dry_run_output(console: Console, tmp_path) -> str:
    from noble_cli.sweep.cli import execute_plan

    plan = grids.activations_sweep("llm-tiny", ["cosnet", "gelu_net"], [0, 1], max_steps=10, check_models=False)
    execute_plan(plan, out=tmp_path, dry_run=True, con=console)
    return console.file.getvalue(), plan


def test_a_sweep_table_in_a_log_shows_whole_run_ids(tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    text, plan = _dry_run_output(make_console(file=io.StringIO()), tmp_path)
    for rid in plan.run_ids:
        assert rid in text, rid
    folded, _ = _dry_run_output(Console(file=io.StringIO()), tmp_path)  # rich's own default for a file: 80 columns
    assert not any(rid in folded for rid in plan.run_ids)


def test_a_sweep_in_a_log_prints_plain_overviews(tmp_path, monkeypatch):
    from noble_cli.sweep.cli import execute_plan

    monkeypatch.delenv("COLUMNS", raising=False)
    plan = grids.activations_sweep("llm-tiny", ["cosnet"], [0], max_steps=10, check_models=False)
    con = make_console(file=io.StringIO())

    def train(cfg, run_dir, **kw):
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text('{"status": "completed", "steps": 10}')
        return SimpleNamespace(summary={"status": "completed"})

    execute_plan(plan, out=tmp_path, con=con, train_fn=train)
    text = con.file.getvalue()
    assert "╭" not in text and "│" not in text.split("sweep " + plan.name + ":")[0]  # no panel before the table
    assert f"sweep {plan.name} · activations on llm-tiny" in text
    assert f"▶ run 1/2: baseline · seed 0 · {plan.run_ids[0]}" in text
    assert f"▶ run 2/2: cosnet r8 · seed 0 · {plan.run_ids[1]}" in text
    # the final table's title on one line, not wrapped to the table's width
    assert re.search(rf"^sweep {plan.name}: 2 done, 0 failed, 0 running, 0 left *$", text, re.M)


def test_the_gpus_launcher_in_a_log_says_when_runs_start_and_finish(tmp_path, monkeypatch):
    from noble_cli.sweep import launchers
    from noble_cli.sweep.manifest import sync_manifest

    monkeypatch.delenv("COLUMNS", raising=False)
    plan = grids.activations_sweep("llm-tiny", ["cosnet"], [0], max_steps=10, check_models=False)
    path, _ = sync_manifest(plan, tmp_path, False, [])
    # each "run" is a process that exits 0 at once: what is printed around it is under test, not training
    monkeypatch.setattr(launchers, "entry_argv", lambda *a, **k: [sys.executable, "-c", "pass"])
    con = make_console(file=io.StringIO())
    outcomes = launchers.run_gpus(path, ["0", "1"], con, poll_s=0.05)
    assert sorted(outcomes["done"]) == [0, 1]
    lines = con.file.getvalue().splitlines()
    for i, gpu in ((0, "0"), (1, "1")):
        assert any(line.startswith(f"started #{i} on GPU {gpu}: ") and plan.run_ids[i] in line for line in lines)
        assert any(re.fullmatch(rf"finished #{i} on GPU {gpu}: done after \d+s", line) for line in lines), lines
    assert "╭" not in con.file.getvalue()


def test_shards_are_prepared_on_first_use_with_a_line_and_once(tmp_path, monkeypatch, capsys):
    from noble_cli.data import shards

    built = []
    real = shards.prepare_embedded

    def slow(*args, **kwargs):  # long enough for the second process-like caller to arrive while it builds
        built.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "prepare_embedded", slow)
    folder, got = tmp_path / "kjv", []
    callers = [threading.Thread(target=lambda: got.append(shards.prepare("embedded", folder, sources=["kjv"],
                                                                         limit=4))) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert got == [folder, folder] and len(built) == 1, "built once; the other caller waited and reused it"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"preparing embedded (gpt2 tokens) in {folder} (once; later runs reuse it) ..."
    assert re.fullmatch(r"prepared [\d,]+ tokens in \d+\.\ds", lines[1]) and len(lines) == 2
    assert shards.prepare("embedded", folder, sources=["kjv"], limit=4) == folder
    assert capsys.readouterr().err == ""  # prepared: nothing to say


def test_a_wordpiece_vocabulary_and_its_mlm_shards_are_built_once_for_two_callers(tmp_path, monkeypatch):
    from noble_cli.data import mlm, wordpiece

    counts = {"vocab": 0, "shards": 0}

    def slowly(fn, key):
        def wrapped(*args, **kwargs):  # long enough for the second caller to arrive while it builds
            counts[key] += 1
            time.sleep(0.5)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(wordpiece, "train_vocab", slowly(wordpiece.train_vocab, "vocab"))
    monkeypatch.setattr(mlm, "prepare_embedded", slowly(mlm.prepare_embedded, "shards"))
    texts = ["the quick brown fox jumps over the lazy dog"] * 50
    vocabs = twice(lambda: wordpiece.train_or_load("embedded", 64, texts=texts, root=tmp_path, log=lambda _: None))
    assert counts["vocab"] == 1 and vocabs[0].vocab_path == vocabs[1].vocab_path
    folders = twice(lambda: mlm.prepare_mlm("embedded", vocabs[0], limit=2, root=tmp_path, log=lambda _: None))
    assert counts["shards"] == 1 and folders[0] == folders[1]


def twice(build) -> list:
    """`build` called by two threads at once (two processes of a sweep, as far as a file lock can tell)."""
    got = []
    callers = [threading.Thread(target=lambda: got.append(build())) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(got) == 2, "a caller failed"
    return got

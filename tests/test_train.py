"""`noble train` end to end on the CPU: loss falls, run folder contract, resume after kill -9, divergence, DDP."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import yaml

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.errors import NobleError
from noble_cli.tasks.base import lr_factor
from noble_cli.train.run import train

# A GPT small enough that a step takes milliseconds (the GPT-2 vocabulary dominates: keep tokens per step small).
TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=2", "model.block_size=32", "data.seq_len=32",
        "trainer.batch_size=8", "trainer.eval_batches=2", "trainer.kernel_warmup_steps=2", "schedule.warmup_steps=5",
        "optim.lr=3e-3", "noble.rank=4"]


def tiny_cfg(**overrides) -> C.RunConfig:
    sets = TINY + [f"{k}={v}" for k, v in overrides.items()]
    return recipes.resolve("llm-tiny", sets=sets)


def eval_curve(run_dir: Path) -> pd.Series:
    m = pd.read_csv(run_dir / "metrics.csv")
    return m.dropna(subset=["eval_loss"]).set_index("step")["eval_loss"]


def test_tiny_run_learns_and_fills_the_run_folder(tmp_path):
    cfg = tiny_cfg(**{"noble.branch": "cosnet", "trainer.max_steps": 40, "trainer.eval_every": 10})
    result = train(cfg, out=tmp_path, progress=False)
    run = result.run_dir
    assert run.parent == tmp_path / "runs" and run.name == C.run_id(cfg)

    curve = eval_curve(run)
    assert list(curve.index) == [10, 20, 30, 40]
    assert curve.iloc[-1] < curve.iloc[0] - 0.3, "eval loss must fall"

    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["step"]) == list(range(1, 41))
    for col in ("train_loss", "step_time_s", "wallclock_s", "lr", "tokens_per_s"):
        assert metrics[col].notna().all(), col
    assert (metrics["wallclock_s"].diff().dropna() > 0).all()
    # the lr a step used: warm-up (5 steps) then cosine, logged before the schedule moves on
    expected = [3e-3 * lr_factor(s - 1, 40, 5, "cosine", 0.1) for s in metrics["step"]]
    assert metrics["lr"].tolist() == pytest.approx(expected)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["best_eval_loss"] == pytest.approx(curve.min())
    assert summary["best_step"] == int(curve.idxmin())
    assert summary["final_eval_loss"] == pytest.approx(curve.iloc[-1])
    assert summary["median_step_time_s"] == pytest.approx(metrics.loc[metrics.step > 2, "step_time_s"].median())

    meta = json.loads((run / "meta.json").read_text())
    for key in ("git_commit", "git_dirty", "versions", "device", "params_total", "params_branch", "recipe",
                "variant", "seed", "pair_key", "variant_key", "world_size", "kernel"):
        assert key in meta, key
    assert meta["variant"] == "cosnet r4" and meta["is_baseline"] is False and meta["params_branch"] > 0
    assert {"torch", "lightning", "python"} <= set(meta["versions"])

    saved = recipes.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert C.config_hash(saved) == C.config_hash(cfg), "the saved config is enough to rerun the run"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "best.ckpt").exists()
    assert (run / "checkpoints" / "hyperparameters.yaml").exists()
    assert not list(run.rglob("*.tmp")), "no temporary files left behind"

    with pytest.raises(NobleError, match="already exists .*--resume.*--overwrite"):
        train(cfg, out=tmp_path, progress=False)


def test_rank_0_decides_the_folder_and_spawned_processes_inherit_its_decision(tmp_path, monkeypatch):
    """The folder's state is decided read-only and acted on by rank 0 alone; a process that Lightning's launcher
    spawned for the run takes its first process's decision from the environment instead of looking again (by then
    rank 0 has written into the folder, which would read as "already exists")."""
    from noble_cli.train import decided_by_parent, mark_decided
    from noble_cli.train import run as R
    from noble_cli.train.run_folder import RunFolder

    cfg = tiny_cfg(**{"trainer.max_steps": 4, "trainer.eval_every": 2})
    done = RunFolder(train(cfg, out=tmp_path, progress=False).run_dir)
    assert R.folder_state(cfg, RunFolder(tmp_path / "none"), resume=True, overwrite=False) == "new"
    assert R.folder_state(cfg, done, resume=True, overwrite=False) == "done"
    assert R.folder_state(cfg, done, resume=False, overwrite=True) == "overwrite"
    with pytest.raises(NobleError, match="already exists"):
        R.folder_state(cfg, done, resume=False, overwrite=False)
    other = tiny_cfg(**{"trainer.max_steps": 4, "trainer.eval_every": 2, "optim.lr": 1e-3})
    with pytest.raises(NobleError, match="config differs"):
        R.folder_state(other, done, resume=True, overwrite=False)

    monkeypatch.delenv(R.PREPARED_ENV, raising=False)
    assert decided_by_parent(done.path) is None
    mark_decided(done.path, "new")
    assert decided_by_parent(done.path) == "new" and decided_by_parent(tmp_path / "other") is None
    # a spawned process trains alongside its first process: no refusal although the folder exists
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    assert R.decide_folder(trainer, cfg, done, resume=False, overwrite=False) == "new"
    monkeypatch.delenv(R.PREPARED_ENV)
    with pytest.raises(NobleError, match="already exists"):
        R.decide_folder(trainer, cfg, done, resume=False, overwrite=False)
    assert R.prepare_folder(cfg, done, resume=False, overwrite=True) == "new" and not done.path.exists()


def torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "noble_cli",
           *args]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_ranks_follow_rank_0s_decision(tmp_path):
    """All processes of a torchrun (or srun) launch start at once. Rank 0 decides and the others follow through
    Lightning's broadcast: a refusal and a completed run end every rank at once (none left waiting for rank 0 in
    a collective), and a new run trains on both."""
    args = ["train", "llm-tiny", "--devices", "2", "--strategy", "ddp", "--max-steps", "4", "--out", str(tmp_path),
            "--set", "trainer.accelerator=cpu", "--set", "trainer.eval_every=2"]
    for s in TINY:
        args += ["--set", s]
    first = torchrun(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert json.loads((run / "meta.json").read_text())["world_size"] == 2
    again = torchrun(*args, timeout=120)
    assert again.returncode != 0 and again.stderr.count("already exists") == 2, again.stderr[-3000:]
    resumed = torchrun(*args, "--resume", timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(pd.read_csv(run / "metrics.csv")) == 4, "a completed run is left alone"


def test_log_every_thins_the_rows_not_the_clock(tmp_path):
    cfg = tiny_cfg(**{"trainer.max_steps": 10, "trainer.eval_every": 5, "trainer.log_every": 4})
    metrics = pd.read_csv(train(cfg, out=tmp_path, progress=False).run_dir / "metrics.csv")
    assert list(metrics["step"]) == [1, 4, 5, 8, 10]  # step 1, every 4th, and the evaluations at 5 and 10
    assert metrics.set_index("step")["eval_loss"].dropna().index.tolist() == [5, 10]
    assert (metrics["wallclock_s"].diff().dropna() > 0).all()
    # the clock runs over the unlogged steps too: ten steps take longer than the four logged ones
    assert metrics["wallclock_s"].iloc[-1] > metrics["step_time_s"].sum()


def test_meta_records_the_kernel_that_runs(monkeypatch):
    from noble_cli.tasks.base import planned_implementation

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    noble = tiny_cfg(**{"noble.branch": "cosnet", "noble.kernel": "triton"}).noble
    assert planned_implementation(noble, on_cuda=True).kernel == "triton"
    assert planned_implementation(noble, on_cuda=False).kernel == "torch"  # NobleLinear falls back off CUDA: say so
    gelu = tiny_cfg(**{"noble.branch": "gelu_net", "noble.kernel": "triton"}).noble
    assert planned_implementation(gelu, on_cuda=True).kernel == "torch"  # the fused kernels are CosNet's only


def test_mfu_peak_table_matches_whole_card_names():
    from noble_cli.train.recorder import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L40S") == 362e12 and peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("NVIDIA A10G") is None
    assert peak_flops("NVIDIA GeForce RTX 3090") is None


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import lightning as L
    sys.path.insert(0, {tests!r})
    from test_train import tiny_cfg
    from noble_cli.train.run import train

    class KillAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as with kill -9

    train(tiny_cfg(**{overrides!r}), out=Path({out!r}), progress=False, callbacks=[KillAt()])
""")


def killed_run(tmp_path, overrides: dict, kill_at: int) -> tuple[C.RunConfig, Path]:
    """Train tiny_cfg(**overrides) in a subprocess that SIGKILLs itself after step `kill_at`, under tmp_path/a.
    Returns the config and the killed run's folder (its status still "running")."""
    script = tmp_path / "killed.py"
    script.write_text(KILLER.format(tests=str(Path(__file__).parent), kill_at=kill_at, overrides=overrides,
                                    out=str(tmp_path / "a")))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cfg = tiny_cfg(**overrides)
    run = tmp_path / "a" / "runs" / C.run_id(cfg)
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    return cfg, run


def resume_matches_an_uninterrupted_run(tmp_path, cfg: C.RunConfig) -> None:
    """Resume the killed run under tmp_path/a, train the same config uninterrupted under tmp_path/b, and assert the
    same train loss at every step and the same eval losses."""
    resumed = train(cfg, out=tmp_path / "a", resume=True, progress=False)
    straight = train(cfg, out=tmp_path / "b", progress=False)
    a = pd.read_csv(resumed.run_dir / "metrics.csv").set_index("step")
    b = pd.read_csv(straight.run_dir / "metrics.csv").set_index("step")
    assert list(a.index) == list(b.index) == list(range(1, cfg.trainer.max_steps + 1))
    pd.testing.assert_series_equal(a["train_loss"], b["train_loss"], rtol=1e-5, atol=0)
    pd.testing.assert_series_equal(a["eval_loss"].dropna(), b["eval_loss"].dropna(), rtol=1e-5, atol=0)
    assert resumed.summary["status"] == "completed"


def test_resume_after_kill_reaches_the_same_losses(tmp_path):
    # gradient accumulation and dropout: the resumed run must land on the same micro-batch and draw the same masks
    overrides = {"noble.branch": "cosnet", "trainer.max_steps": 16, "trainer.eval_every": 5,
                 "trainer.accumulate": 2, "model.dropout": 0.2}
    cfg, run = killed_run(tmp_path, overrides, kill_at=12)
    assert pd.read_csv(run / "metrics.csv")["step"].max() >= 10
    resume_matches_an_uninterrupted_run(tmp_path, cfg)


TERMINATOR = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import lightning as L
    sys.path.insert(0, {tests!r})
    from test_train import tiny_cfg
    from noble_cli.errors import InterruptedRun
    from noble_cli.train.run import train

    class TermAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preempting a job

    try:
        train(tiny_cfg(**{{"trainer.max_steps": 10}}), out=Path({out!r}), progress=False, callbacks=[TermAt()])
    except InterruptedRun as e:
        sys.exit(e.exit_code)
""")


def test_sigterm_leaves_an_interrupted_resumable_run(tmp_path):
    script = tmp_path / "terminated.py"
    script.write_text(TERMINATOR.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"


class PoisonAt(L.Callback):
    """Makes every weight NaN before step `step`, as a blown-up update would."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.data.fill_(float("nan"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_what_was_done(tmp_path):
    cfg = tiny_cfg(**{"trainer.max_steps": 20, "trainer.eval_every": 5})
    # poisoned before the 8th optimizer step: steps are numbered 1, 2, ... as in metrics.csv
    with pytest.raises(NobleError, match="loss became nan at step 8"):
        train(cfg, out=tmp_path, progress=False, callbacks=[PoisonAt(7)])
    run = tmp_path / "runs" / C.run_id(cfg)
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert pd.read_csv(run / "metrics.csv")["step"].max() == 7  # the good steps stay
    import torch

    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def noble(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "noble_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_ddp_with_two_cpu_processes(tmp_path):
    args = ["train", "llm-tiny", "--devices", "2", "--strategy", "ddp", "--max-steps", "6", "--out", str(tmp_path),
            "--branch", "cosnet", "--set", "trainer.accelerator=cpu", "--set", "trainer.eval_every=3"]
    for s in TINY:
        args += ["--set", s]
    proc = noble(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics["step"]) == list(range(1, 7))
    assert metrics["eval_loss"].notna().sum() == 2
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "llm-nope"], "unknown recipe 'llm-nope'; valid:"),
        (["train", "llm-tiny", "--branch", "relu"], "unknown activation 'relu'; valid:"),
        (["train", "llm-tiny", "--targets", "heads"], "unknown target 'heads'; valid:"),
        (["train", "llm-tiny", "--set", "trainer.max_steps"], "malformed --set"),
        (["train", "llm-tiny", "--bogus"], "No such option: --bogus"),
        (["train", "llm-tiny", "--set", "data.dataset=/no/such/corpus.txt", "--max-steps", "1"], "/no/such/corpus.txt"),
        (["train", "llm-tiny", "--strategy", "foo"], "invalid trainer settings .*strategy='foo'"),
        (["train", "llm-tiny", "--devices", "0"], "invalid trainer settings .*devices=0"),
        (["train", "llm-tiny", "--resume", "--overwrite"], "--resume and --overwrite contradict"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(args, message, tmp_path):
    proc = noble(*args, "--out", str(tmp_path))
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unwritable_out_and_markup_in_messages_are_one_line_errors(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    for args in (["train", "llm-tiny", "--max-steps", "30", "--out", str(afile)],  # --out is a file
                 ["ablate", "layers", "--targets", "[/x]", "--seeds", "0", "--dry-run", "--out", str(tmp_path)]):
        proc = noble(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "[/x]" in proc.stderr  # rich markup in a user's value is printed, not interpreted


def test_dry_run_prints_the_resolved_config_and_trains_nothing(tmp_path):
    proc = noble("train", "llm-tiny", "--branch", "cosnet", "--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "branch: cosnet" in proc.stdout and "run id:" in proc.stdout
    assert not (tmp_path / "runs").exists()


SLOW_EVAL_S = 3.0


class SlowAfterEval(L.Callback):
    """Stands in for a slow evaluation tail (a large checkpoint): must not count as training time."""

    def on_validation_end(self, trainer, pl_module):
        import time

        time.sleep(SLOW_EVAL_S)


def test_an_uneven_budget_ends_evaluated_and_checkpointed_and_resume_leaves_it_alone(tmp_path):
    import torch

    cfg = tiny_cfg(**{"trainer.max_steps": 7, "trainer.eval_every": 5})
    first = train(cfg, out=tmp_path, progress=False, callbacks=[SlowAfterEval()])
    assert list(eval_curve(first.run_dir).index) == [5, 7]
    ckpt = torch.load(first.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 7
    best = torch.load(first.run_dir / "checkpoints" / "best.ckpt", weights_only=False)
    assert best["global_step"] == first.summary["best_step"]
    step_times = pd.read_csv(first.run_dir / "metrics.csv").set_index("step")["step_time_s"]
    # (against the other steps, not a fixed time: a loaded machine makes every step slow)
    assert step_times[6] < step_times.drop(6).median() + SLOW_EVAL_S * 2 / 3, "the time after an evaluation is " \
        "not the next step's"

    again = train(cfg, out=tmp_path, resume=True, progress=False)
    assert again.already_done and again.summary == first.summary
    assert json.loads((first.run_dir / "summary.json").read_text()) == first.summary


def test_fsdp_wraps_and_checkpoints_the_transformer_blocks():
    from lightning.pytorch.strategies import FSDPStrategy

    from noble_cli.models.gpt import Block
    from noble_cli.tasks.causal_lm import TASK
    from noble_cli.train.run import strategy_for

    cfg = recipes.resolve("llm-1.5b", {"noble.branch": "cosnet", "trainer.strategy": "fsdp"},
                    ["model.n_layer=2", "model.d_model=128", "model.n_head=2"])
    module = TASK.build_module(cfg)
    assert module.block_types() == {Block}
    strategy = strategy_for(cfg, module)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy._activation_checkpointing_kwargs, "llm-1.5b checkpoints activations block by block"

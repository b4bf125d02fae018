"""Shared fixtures. `tracked_run`: one tiny real run, trained once per session, that several test files read."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest

# A CosNet GPT small enough for a few CPU steps; 4 steps, evaluations at steps 2 and 4.
TRACKED_SETS = ["model.d_model=32", "model.n_head=2", "model.n_layer=1", "model.block_size=16", "data.seq_len=16",
                "trainer.batch_size=2", "trainer.eval_batches=1", "trainer.eval_every=2", "trainer.max_steps=4",
                "trainer.kernel_warmup_steps=1", "schedule.warmup_steps=1", "noble.branch=cosnet", "noble.rank=4"]


class BrokenTracker:
    """A tracker whose third logging call raises, as one losing its connection mid-run would."""

    def __init__(self):
        self.calls = 0
        self.finalized = False

    def log_hyperparams(self, params):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        if self.calls == 3:
            raise ConnectionError("connection reset by peer")

    def finalize(self, status):
        self.finalized = True


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory):
    """`train` of TRACKED_SETS with --logger tensorboard, wandb and mlflow (offline), as a run of sweep "study-a",
    with stdout and stderr captured as a log file would (not a terminal; a progress line at every step), and a
    fourth tracker that breaks at its third call."""
    from noble_cli import config as C
    from noble_cli import recipes, trackers
    from noble_cli.train.run import train

    out = tmp_path_factory.mktemp("tracked")
    cfg = recipes.resolve("llm-tiny", sets=TRACKED_SETS + ["trainer.logger=[tensorboard, wandb, mlflow]"])
    stdout, stderr = io.StringIO(), io.StringIO()
    broken = BrokenTracker()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOBLE_PROGRESS_SECONDS", "0")
        mp.setenv(trackers.SWEEP_ENV, "study-a")
        for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
                    "COLUMNS"):
            mp.delenv(var, raising=False)
        mp.setenv("NETRC", str(out / "no-netrc"))  # no W&B key: offline
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # W&B's own files, not in $HOME
            mp.setenv(var, str(out / "wandb-home"))
        opened = trackers.open_trackers

        def with_broken(*args, **kwargs):
            t = opened(*args, **kwargs)
            t.loggers.append(("broken", broken))
            return t

        mp.setattr(trackers, "open_trackers", with_broken)
        with redirect_stdout(stdout), redirect_stderr(stderr):
            result = train(cfg, out=out, progress=True)
    return SimpleNamespace(out=out, cfg=cfg, run_id=C.run_id(cfg), result=result, broken=broken,
                           stdout=stdout.getvalue(), stderr=stderr.getvalue())


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster and steadier than two OpenMP threads on a busy 2-core machine,
    which stall for up to a second a step. A module opts in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_noble(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`noble ARGS` in this process, as the `noble` command runs it: (exit code, stdout, stderr)."""
    import sys

    from noble_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["noble", *args])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err

"""Experiment trackers (`--logger`): what the run folder records reaches TensorBoard, MLflow and W&B (offline), read
back with each tool's own reader; a tracker failing is one warning and the run goes on; run ids do not change."""

from __future__ import annotations

import io
import json
import os
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
from conftest import TRACKED_SETS

from noble_cli import config as C
from noble_cli import recipes
from noble_cli import trackers
from noble_cli.console import make_console
from noble_cli.errors import NobleError

METRIC_COLUMNS = ("train_loss", "lr", "step_time_s", "wallclock_s", "tokens_per_s", "eval_loss", "eval_bpb")


def folder_metrics(run) -> pd.DataFrame:
    return pd.read_csv(run.result.run_dir / "metrics.csv").set_index("step")


def recorded_columns(run) -> list[str]:
    """Every metric column of the run's metrics.csv (at least METRIC_COLUMNS)."""
    columns = list(folder_metrics(run).columns)
    assert set(METRIC_COLUMNS) <= set(columns)
    return columns


def expected(run, column: str) -> list[tuple[int, float]]:
    col = folder_metrics(run)[column].dropna()
    return [(int(s), float(v)) for s, v in col.items()]


def test_the_run_completes_with_its_trackers(tracked_run):
    assert tracked_run.result.summary["status"] == "completed"
    assert set(expected(tracked_run, "eval_loss")) and [s for s, _ in expected(tracked_run, "eval_loss")] == [2, 4]
    config = tracked_run.result.run_dir / "config.yaml"
    assert "logger:" in config.read_text()  # the resolved config says where the run went ...
    # ... but its run id is the one without trackers
    assert tracked_run.result.run_dir.name == C.run_id(recipes.resolve("llm-tiny", sets=TRACKED_SETS))


def test_tensorboard_event_files_hold_every_metric(tracked_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tracked_run.out / "tensorboard" / "study-a" / tracked_run.run_id  # grouped by the sweep
    events = EventAccumulator(str(log_dir))
    events.Reload()
    for column in recorded_columns(tracked_run):
        got = [(e.step, e.value) for e in events.Scalars(column)]
        want = expected(tracked_run, column)
        assert [s for s, _ in got] == [s for s, _ in want], column
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), column
    assert (log_dir / "hparams.yaml").exists()


def test_mlflow_file_store_holds_metrics_config_and_run_name(tracked_run, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((tracked_run.out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("study-a")  # the sweep's name
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == tracked_run.run_id and run.info.status == "FINISHED"
    assert run.data.tags["noble.run_id"] == tracked_run.run_id
    for column in recorded_columns(tracked_run):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        want = expected(tracked_run, column)
        assert [s for s, _ in got] == [s for s, _ in want], column
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), column
    params = run.data.params
    assert float(params["optim/lr"]) == tracked_run.cfg.optim.lr
    assert params["noble/branch"] == "cosnet" and params["run/run_id"] == tracked_run.run_id


def test_wandb_offline_run_directory(tracked_run):
    pytest.importorskip("wandb")
    meta = json.loads((tracked_run.result.run_dir / "meta.json").read_text())
    instance = trackers.instance_id(tracked_run.run_id, meta)
    (run_dir,) = (tracked_run.out / "wandb").glob(f"offline-run-*-{instance}")
    data = (run_dir / f"run-{instance}.wandb").read_bytes()  # W&B's record log: names and values as written
    for needle in (tracked_run.run_id, "study-a", *METRIC_COLUMNS, "optim", "cosnet"):
        assert needle.encode() in data, needle
    assert f"wandb: offline run in {run_dir}" in tracked_run.stderr  # and where to find it, once


def test_a_tracker_failing_mid_run_is_one_warning_and_the_run_goes_on(tracked_run):
    warnings = [line for line in tracked_run.stderr.splitlines() if "--logger broken" in line]
    assert len(warnings) == 1, tracked_run.stderr
    assert "failed logging step" in warnings[0] and "ConnectionError: connection reset by peer" in warnings[0]
    assert "the run goes on without it" in warnings[0]
    assert tracked_run.broken.calls == 3 and not tracked_run.broken.finalized  # dropped at its failure
    assert list(folder_metrics(tracked_run).index) == [1, 2, 3, 4]  # the run folder is whole


class Recording:
    def __init__(self, fail_on: str = ""):
        self.fail_on, self.metrics, self.params, self.status = fail_on, [], [], None

    def log_hyperparams(self, params):
        if self.fail_on == "params":
            raise PermissionError("401 Unauthorized: bad API key")
        self.params.append(params)

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def finalize(self, status):
        self.status = status


def test_trackers_guard_every_call():
    said: list[str] = []
    good, bad = Recording(), Recording(fail_on="params")
    t = trackers.Trackers([("tensorboard", good), ("wandb", bad)], warn=said.append)
    t.log_hyperparams({"a": 1})
    assert len(said) == 1 and "--logger wandb failed logging the config" in said[0] and "401" in said[0]
    t.log_metrics({"step": 3, "train_loss": 2.5, "lr": None}, step=3)
    t.close("interrupted")
    t.close("completed")  # closed once
    assert good.metrics == [(3, {"train_loss": 2.5})] and good.status == "KILLED" and bad.status is None
    assert len(said) == 1


def test_a_tracker_not_installed_is_one_warning(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ModuleNotFoundError
    said: list[str] = []
    t = trackers.open_trackers(["wandb"], out=tmp_path, run_id="r", meta={}, params={}, fresh=True, warn=said.append)
    assert not t and len(said) == 1
    assert said[0] == ('--logger wandb: the wandb package is not installed (pip install "noble-cli[wandb]"); '
                       "the run goes on without it")


def test_mlflow_resume_continues_the_same_run_and_overwrite_starts_another(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    said: list[str] = []

    def start(created_at: str, lr: float):
        t = trackers.open_trackers("mlflow", out=tmp_path, run_id="llm-tiny-x-s0-abc", meta={"created_at": created_at},
                                   params={"optim": {"lr": lr}}, fresh=True, group="g", warn=said.append)
        (_, logger), = t.loggers
        t.log_metrics({"eval_loss": lr}, step=1)
        t.close("interrupted")
        return logger.run_id

    first = start("2026-01-01T00:00:00", 0.1)
    # a resume: the same run, whose parameters MLflow would refuse to change, is continued and not re-parametrised
    assert start("2026-01-01T00:00:00", 0.2) == first
    assert start("2026-02-02T00:00:00", 0.3) != first  # --overwrite made a new run folder: a new MLflow run
    assert said == []
    client = MlflowClient((tmp_path / "mlruns").as_uri())
    assert client.get_run(first).data.params["optim/lr"] == "0.1"
    assert [m.value for m in client.get_metric_history(first, "eval_loss")] == [0.1, 0.2]


@pytest.mark.parametrize("value, parsed", [
    (None, ()), ("", ()), ("tensorboard", ("tensorboard",)), ("wandb,MLflow", ("wandb", "mlflow")),
    (["tensorboard", "wandb", "tensorboard"], ("tensorboard", "wandb")),
])
def test_logger_values(value, parsed):
    assert C.parse_loggers(value) == parsed


def test_a_logger_is_not_part_of_the_run_id_and_a_bad_one_is_refused():
    plain = recipes.resolve("llm-tiny")
    tracked = recipes.resolve("llm-tiny", {"trainer.logger": ["wandb", "mlflow"]})
    assert tracked.trainer.logger == ("wandb", "mlflow")
    assert C.run_id(tracked) == C.run_id(plain) and C.pair_key(tracked) == C.pair_key(plain)
    with pytest.raises(NobleError, match=r"^unknown logger 'neptune'; valid: tensorboard, wandb, mlflow"):
        recipes.resolve("llm-tiny", sets=["trainer.logger=neptune"])


def test_noble_train_logger_option_bad_value_is_one_line(monkeypatch, capsys):
    from noble_cli.cli import app
    from noble_cli.entry import run_app

    monkeypatch.setattr(sys, "argv", ["noble", "train", "llm-tiny", "--logger", "tensorbord", "--dry-run"])
    with pytest.raises(SystemExit) as exit_:
        run_app(app)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown logger 'tensorbord'; valid: tensorboard, wandb, mlflow (repeat --logger for several)"


def test_a_sweep_sends_its_runs_to_the_trackers_grouped_by_its_name(tmp_path, monkeypatch):
    from noble_cli.sweep import grids
    from noble_cli.sweep.cli import execute_plan
    from noble_cli.sweep.launchers import entry_argv, write_slurm_script
    from noble_cli.sweep.manifest import manifest_path, read_manifest

    monkeypatch.delenv(trackers.SWEEP_ENV, raising=False)
    seen = []

    def train(cfg, out, resume=False, overwrite=False, run_dir=None, progress=True):
        seen.append((cfg.trainer.logger, os.environ.get(trackers.SWEEP_ENV), C.run_id(cfg)))
        return SimpleNamespace(summary={"status": "completed"})

    plan = grids.activations_sweep("llm-tiny", ["cosnet"], [0], max_steps=10, check_models=False)
    execute_plan(plan, out=tmp_path, train_fn=train, con=make_console(file=io.StringIO()),
                 loggers=["wandb", "tensorboard"])
    assert seen == [(("wandb", "tensorboard"), plan.name, rid) for rid in plan.run_ids]
    assert trackers.SWEEP_ENV not in os.environ  # set for each run only
    path = manifest_path(tmp_path, plan.name)
    assert all(not e["config"]["trainer"]["logger"] for e in read_manifest(path)["runs"])  # not in the definition
    # the launchers that start a process per run pass them on
    assert entry_argv(path, 0, True, loggers=("wandb", "mlflow"))[-4:] == ["--logger", "wandb", "--logger", "mlflow"]
    script, _ = write_slurm_script(path, loggers=("mlflow",))
    assert '"${SLURM_ARRAY_TASK_ID}" --logger mlflow\n' in script.read_text()


def test_every_ablation_takes_the_logger_option():
    """--logger is a sweep option of every `noble ablate` study, not only of the ones that existed when it came."""
    import inspect

    from noble_cli.sweep.cli import ablate_app

    commands = [c for c in ablate_app.registered_commands if not c.hidden]
    assert len(commands) >= 7
    missing = [c.callback.__name__ for c in commands if "logger" not in inspect.signature(c.callback).parameters]
    assert missing == []


def test_wandb_goes_online_only_with_a_key_for_its_server(tmp_path, monkeypatch):
    """What `wandb login` leaves (a netrc entry for the installed wandb's server, whatever it is called in this
    version, or for $WANDB_BASE_URL) makes runs online; nothing, or a key for another server, keeps them offline."""
    wandb = pytest.importorskip("wandb")
    from urllib.parse import urlparse

    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    rc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(rc))
    assert trackers.wandb_mode() == "offline"  # no netrc at all
    default_host = urlparse(wandb.Settings().base_url).hostname
    rc.write_text(f"machine {default_host}\n  login user\n  password {'k' * 40}\n")
    rc.chmod(0o600)
    assert trackers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert trackers.wandb_mode() == "offline"  # the key is for another server
    rc.write_text(f"machine wandb.example.org\n  login user\n  password {'k' * 40}\n")
    assert trackers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode() == "disabled"  # the user's choice wins

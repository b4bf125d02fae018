"""Experiment trackers (`--logger tensorboard|wandb|mlflow`): Lightning's own loggers, fed by the run recorder.

The run folder stays the source of truth: a tracker gets a copy of each row the recorder writes to metrics.csv
(train and eval metrics, at the same step), the resolved config as hyperparameters, and the run id as its name.
Rows are sent when metrics.csv is rewritten (every 30 s, at each evaluation and at the end), not one call a step.
The loggers are not given to Lightning's Trainer: it would also send whatever modules `self.log` (under other names
and steps) and stop the run when a logger raises. Here each call is guarded instead: a tracker that fails (not
installed, bad credentials, a call raising mid-run) gives one warning and is dropped, and the run goes on.

Where each one writes, offline by default (no network needed):
- tensorboard: `<results>/tensorboard/[<sweep>/]<run id>/` (event files);
- wandb: `<results>/wandb/` (offline runs, `wandb sync` them later) unless an API key is configured
  ($WANDB_API_KEY or `wandb login`) or $WANDB_MODE says otherwise; project $WANDB_PROJECT or "noble", group = the
  sweep;
- mlflow: $MLFLOW_TRACKING_URI, else a file store `<results>/mlruns/`; experiment = the sweep (else
  $MLFLOW_EXPERIMENT_NAME or "noble").
A resumed run continues its tracker run (the same W&B id, the MLflow run tagged with the same folder instance, the
same TensorBoard folder); `--overwrite` starts new ones. A run killed between two checkpoints repeats the steps
after the last one when it resumes, and the tracker receives those steps again (metrics.csv keeps the last copy;
TensorBoard and MLflow show both points at such a step).
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from rich.markup import escape

from noble_cli.config import parse_loggers
from noble_cli.console import make_console

# The package each tracker needs; the extra that installs it has the tracker's name (noble-cli[wandb], ...).
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
SWEEP_ENV = "NOBLE_SWEEP_NAME"  # set by a sweep while it trains one of its runs: the trackers' group
DEFAULT_PROJECT = "noble"


def _warn_console(message: str) -> None:
    make_console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def _note_console(message: str) -> None:
    make_console(stderr=True).print(message, highlight=False, markup=False)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class Trackers:
    """The trackers of one run, each call guarded: the first failure of a tracker is one warning and drops it."""

    def __init__(self, loggers: list[tuple[str, Any]] | None = None, warn: Callable[[str], None] = _warn_console):
        self.loggers = list(loggers or [])
        self._warn = warn
        self._closed = False

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def _call(self, what: str, fn: Callable[[str, Any], None]) -> None:
        for name, logger in list(self.loggers):
            try:
                fn(name, logger)
            except Exception as e:  # noqa: BLE001 - a tracker must never stop a run
                self.loggers.remove((name, logger))
                self._warn(f"--logger {name} failed {what} ({_one_line(e)}); the run goes on without it "
                           "(its run folder has every metric)")

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        metrics = {k: _number(v) for k, v in metrics.items() if k != "step"}
        metrics = {k: v for k, v in metrics.items() if v is not None}
        if metrics:
            self._call(f"logging step {step}", lambda _, lg: lg.log_metrics(metrics, step=step))

    def log_hyperparams(self, params: dict, skip: tuple[str, ...] = ()) -> None:
        self._call("logging the config", lambda name, lg: None if name in skip else lg.log_hyperparams(params))

    def close(self, status: str) -> None:
        """Finish every tracker run once: `status` is summary.json's (completed, interrupted, failed, diverged)."""
        if self._closed:
            return
        self._closed = True
        lightning_status = {"completed": "success", "interrupted": "KILLED"}.get(status, "failed")

        def close_one(name: str, logger) -> None:
            logger.finalize(lightning_status)
            if name == "wandb":  # the run ends here, not at exit: the next run of an in-process sweep gets its own
                logger.experiment.finish(exit_code=0 if status == "completed" else 1)

        self._call("closing its run", close_one)
        self.loggers = []


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def instance_id(run_id: str, meta: dict) -> str:
    """One id per run folder instance: the same across resumes, a new one after --overwrite (a new created_at)."""
    return hashlib.sha1(f"{run_id}|{meta.get('created_at', '')}".encode()).hexdigest()[:16]


def _wandb_key_configured() -> bool:
    """An API key wandb would find: $WANDB_API_KEY, or a netrc entry (what `wandb login` writes) for its server:
    $WANDB_BASE_URL, else the installed wandb's default server (it moved from api.wandb.ai in recent versions, so
    both are looked up). wandb's own lookup is internal API; a server saved by `wandb login --host` alone is not
    seen here: set $WANDB_BASE_URL or $WANDB_MODE=online for it."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import wandb

    urls = [os.environ["WANDB_BASE_URL"]] if os.environ.get("WANDB_BASE_URL") else [
        wandb.Settings().base_url, "https://api.wandb.ai"]
    try:
        entries = netrc.netrc(os.environ.get("NETRC"))
    except (OSError, netrc.NetrcParseError):
        return False
    return any(entries.authenticators(urlparse(u).hostname) is not None for u in urls)


def wandb_mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")


def _tensorboard(out: Path, run_id: str, group: str | None, fresh: bool):
    from lightning.pytorch.loggers import TensorBoardLogger

    save_dir = out / "tensorboard"
    log_dir = save_dir / (group or "") / run_id
    if fresh and log_dir.exists():  # event files of a run folder that --overwrite replaced
        shutil.rmtree(log_dir)
    return TensorBoardLogger(save_dir=save_dir, name=group or "", version=run_id, default_hp_metric=False,
                             flush_secs=30), False


def _wandb(out: Path, run_id: str, group: str | None, instance: str, note: Callable[[str], None]):
    from lightning.pytorch.loggers import WandbLogger

    import wandb

    out.mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()
    # console="off": wandb would otherwise wrap stdout/stderr, which changes how rich sees the terminal; silent:
    # its banner lines (and a deprecation notice about a setting Lightning passes) would crowd the run's output,
    # the one line that matters is printed below
    # The run is started here and handed to Lightning's logger, which would otherwise pass wandb a setting that
    # recent wandb versions warn about on every run.
    run = wandb.init(name=run_id, dir=str(out), id=instance, project=os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                     group=group, job_type="train", mode=mode, resume="allow",
                     settings=wandb.Settings(console="off", silent=True))
    # as Lightning's logger does for runs it starts: the trainer's step is the x-axis of every metric
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    logger = WandbLogger(experiment=run)
    if mode == "offline":
        note(f"wandb: offline run in {Path(run.dir).parent} (upload it with `wandb sync` on a machine "
             "with network; `wandb login` or $WANDB_API_KEY makes later runs go online)")
    return logger, False


def mlflow_uri(out: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (out.resolve() / "mlruns").as_uri()


def _mlflow(out: Path, run_id: str, group: str | None, instance: str, meta: dict):
    from lightning.pytorch.loggers import MLFlowLogger

    from mlflow.tracking import MlflowClient

    uri = mlflow_uri(out)
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless this is set; a folder of files, with no server or database, is
        # what an offline run needs (mlflow-skinny has no SQL backend anyway)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    experiment = group or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
    existing = None  # this run folder's MLflow run, if it has one (a resume)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        runs = client.search_runs([found.experiment_id], f"tags.`noble.instance` = '{instance}'", max_results=1)
        existing = runs[0].info.run_id if runs else None
    tags = {"noble.run_id": run_id, "noble.instance": instance, "noble.variant": str(meta.get("variant", "")),
            "noble.recipe": str(meta.get("recipe", "")), "noble.seed": str(meta.get("seed", ""))}
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)  # "Experiment ... Creating it."
    logger = MLFlowLogger(experiment_name=experiment, run_name=run_id, tracking_uri=uri, tags=tags, run_id=existing)
    # MLflow refuses to change a parameter once logged: a resumed run keeps the parameters it started with
    return logger, existing is not None


def open_trackers(names: Any, *, out: Path, run_id: str, meta: dict, params: dict, fresh: bool,
                  group: str | None = None, warn: Callable[[str], None] = _warn_console,
                  note: Callable[[str], None] = _note_console) -> Trackers:
    """Start the named trackers for one run (global rank 0 only) and log its config. `fresh`: a new run folder
    (not a resume). `group`: the sweep the run belongs to (default: $NOBLE_SWEEP_NAME)."""
    names = parse_loggers(names)
    if not names:
        return Trackers(warn=warn)
    out = Path(out)
    group = group if group is not None else os.environ.get(SWEEP_ENV) or None
    instance = instance_id(run_id, meta)
    loggers: list[tuple[str, Any]] = []
    skip_params: list[str] = []
    for name in names:
        try:
            if name == "tensorboard":
                logger, resumed = _tensorboard(out, run_id, group, fresh)
            elif name == "wandb":
                logger, resumed = _wandb(out, run_id, group, instance, note)
            else:
                logger, resumed = _mlflow(out, run_id, group, instance, meta)
            logger.experiment  # noqa: B018 - start it now, so that bad credentials show at the start, not mid-run
        except ModuleNotFoundError as e:  # Lightning's own check names no module (e.name is None)
            what = (f"the {PACKAGES[name]} package is not installed" if e.name in (None, name)
                    else f"cannot import {e.name}")
            warn(f"--logger {name}: {what} (pip install \"noble-cli[{name}]\"); the run goes on without it")
            continue
        except Exception as e:  # noqa: BLE001 - bad credentials, no network, an unwritable folder: never fatal
            warn(f"--logger {name} cannot start ({_one_line(e)}); the run goes on without it "
                 "(its run folder has every metric)")
            continue
        loggers.append((name, logger))
        if resumed:
            skip_params.append(name)
    trackers = Trackers(loggers, warn=warn)
    trackers.log_hyperparams(params, skip=tuple(skip_params))
    return trackers


def run_params(cfg_dict: dict, meta: dict) -> dict:
    """The hyperparameters a tracker gets: the resolved config, and who the run is."""
    who = {k: meta.get(k) for k in ("run_id", "variant", "role", "pair_key", "variant_key", "params_total",
                                     "params_branch", "git_commit") if k in meta}
    return {**cfg_dict, "run": who}

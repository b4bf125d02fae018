"""`noble train`: one run, from a resolved config to a complete run folder, on Lightning's Trainer."""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from noble_cli import trackers
from noble_cli.atomic import atomic_write_text, is_stale_temp
from noble_cli.config import RunConfig, config_hash, run_id, to_yaml
from noble_cli.console import format_duration, make_console, progress_seconds
from noble_cli.errors import InterruptedRun, NobleError
from noble_cli.recipes import from_dict, resolve
from noble_cli.tasks import get_task
from noble_cli.train import PREPARED_ENV, decided_by_parent, mark_decided
from noble_cli.train.flops import FlopsProbe
from noble_cli.train.kernel_check import KernelSelfCheck
from noble_cli.train.recorder import AtomicCheckpointIO, DivergedError, RunRecorder
from noble_cli.train.run_folder import RunFolder


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar, counting optimizer steps of the budget: runs here are step-budgeted, so "Epoch 0/-2"
    would mislead, and Lightning's own count mixes micro-batches (done) with steps (total) under accumulation."""

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self.progress is not None and self.train_progress_bar_id is not None:  # a resumed run starts part-way
            self.progress.reset(self.train_progress_bar_id, total=trainer.max_steps, completed=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # not the parent's: it would first set the count to the micro-batch index, and rich would take the jump
        # back to the step count for progress (a rate several times too high under accumulation)
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()


def _rate(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.1f}"


class LogProgress(ProgressBar):
    """Progress for a log file (no terminal): a line at the first step, then one every `every_s` seconds and at
    the last step, with step, loss, throughput and ETA, and a line per evaluation. A redrawn bar would write its
    every frame into the file. Its figures are the recorder's (metrics.csv's)."""

    def __init__(self, recorder: RunRecorder, console: Console, every_s: float):
        super().__init__()
        self.recorder, self.console, self.every_s = recorder, console, every_s
        self._enabled = True
        self._t0 = self._last = 0.0
        self._step0 = 0
        self._since = 0  # the step of the last line: throughput is over the steps since then

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.monotonic()
        self._step0 = self._since = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, trainer.max_steps
        now = time.monotonic()
        if not self._enabled or step == self._since:  # a micro-batch, not an optimizer step
            return
        if step != self._step0 + 1 and step < total and now - self._last < self.every_s:
            return
        self.console.print(self.train_line(step, total, now), highlight=False, markup=False)
        self._last, self._since = now, step

    def train_line(self, step: int, total: int, now: float) -> str:
        rows = [r for s, r in self.recorder.rows.items() if self._since < s <= step and "train_loss" in r]
        parts = [f"train step {step}/{total} ({100 * step / max(1, total):.0f}%)"]
        if rows:
            parts.append(f"loss {rows[-1]['train_loss']:.4f}")
            for key in [k for k in rows[-1] if k.endswith("_per_s")]:
                timed = [r for r in rows if r.get(key) and r.get("step_time_s")]
                if timed:  # items over time, evaluation excluded
                    rate = sum(r[key] * r["step_time_s"] for r in timed) / sum(r["step_time_s"] for r in timed)
                    parts.append(f"{key[:-len('_per_s')]}/s {_rate(rate)}")
        elapsed, done = now - self._t0, step - self._step0
        parts.append(f"elapsed {format_duration(elapsed)}")
        if done and step < total:
            parts.append(f"ETA {format_duration(elapsed / done * (total - step))}")
        return "  ".join(parts)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        step = trainer.global_step
        row = self.recorder.rows.get(step, {})
        evals = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("eval_") and v is not None)
        self.console.print(f"eval  step {step}/{trainer.max_steps}  {evals or '(no eval metrics)'}",
                           highlight=False, markup=False)


def progress_callback(recorder: RunRecorder, console: Console | None = None):
    """Lightning's rich bar on a terminal (as always); in a log file or pipe, a line every few seconds."""
    console = console or make_console()
    if console.is_terminal:
        return StepProgressBar(leave=True)
    return LogProgress(recorder, console, progress_seconds())


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict
    meta: dict
    already_done: bool = False  # `--resume` found the run completed and trained nothing


def precision_for(cfg: RunConfig, on_gpu: bool) -> str:
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    return "bf16-mixed" if on_gpu else "32-true"


def strategy_for(cfg: RunConfig, module):
    """Lightning's strategies, by name. FSDP wraps (and optionally checkpoints) the task's transformer blocks."""
    name = cfg.trainer.strategy
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        blocks = module.block_types()
        return FSDPStrategy(
            auto_wrap_policy=blocks or None,
            activation_checkpointing_policy=blocks if cfg.trainer.activation_checkpointing and blocks else None,
        )
    return name


def folder_state(cfg: RunConfig, folder: RunFolder, resume: bool, overwrite: bool) -> str:
    """What to do with the run folder, decided read-only: "new", "overwrite" (delete, then new), "restart" (killed before its first checkpoint: delete, then new),
    "resume" (from checkpoints/last.ckpt) or "done" (already completed). Refusals raise NobleError."""
    if not folder.exists():
        return "new"
    if overwrite:
        return "overwrite"
    summary = folder.read_json(folder.summary_path)
    if not resume:
        raise NobleError(
            f"run folder {folder.path} already exists (status: {summary.get('status', 'unknown')}); "
            "pass --resume to continue it or --overwrite to start it again"
        )
    # checkpoints/hyperparameters.yaml is written with config.yaml, so it still holds the config a hand-edited
    # config.yaml had: restoring it is the fix that keeps the run
    restore = f"restore it with: cp {folder.checkpoint_dir / 'hyperparameters.yaml'} {folder.config_path}"
    try:
        import yaml

        saved = from_dict(yaml.safe_load(folder.config_path.read_text()))
    except Exception as e:  # noqa: BLE001 - a broken folder must not be resumed blindly
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise NobleError(f"cannot resume {folder.path}: its config.yaml is unreadable ({why}); {restore}") from None
    if config_hash(saved) != config_hash(cfg):
        if not folder.path.name.endswith(f"-{config_hash(saved)}"):  # the folder's name is its config's hash
            raise NobleError(f"cannot resume {folder.path}: its config.yaml was edited by hand (it no longer matches "
                             f"the run id); {restore}, or train the edited settings as a new run: noble train "
                             f"{folder.config_path} (without --resume)")
        raise NobleError(f"cannot resume {folder.path}: its config differs from this one; use --overwrite or --out")
    if summary.get("status") == "completed":
        return "done"
    if not folder.last_checkpoint.exists():  # killed before its first checkpoint: nothing worth keeping
        return "restart"
    return "resume"


def check_resume_of_run_config(recipe: str, cfg: RunConfig, resume: bool) -> None:
    """`noble train <run folder>/config.yaml --resume` after that file was edited by hand: the edited settings have
    another run id, so they would quietly start a new run in another folder instead of continuing this one."""
    path = Path(recipe)
    if not resume or path.name != "config.yaml" or not (path.parent / "meta.json").exists():
        return
    folder = RunFolder(path.parent)
    if run_id(cfg) != folder.path.name:
        if run_id(resolve(str(path))) == folder.path.name:  # the file is intact: the options changed the settings
            raise NobleError(f"cannot resume {folder.path}: the options given change its settings, so they would "
                             f"train another run; resume it as it is (noble train {path} --resume), or train the "
                             "new settings as a new run without --resume")
        raise NobleError(f"cannot resume {folder.path}: its config.yaml was edited by hand (it no longer matches the "
                         f"run id); restore it with: cp {folder.checkpoint_dir / 'hyperparameters.yaml'} "
                         f"{folder.config_path}, or train the edited settings as a new run without --resume")


# How training draws its data and randomness (batch order, augmentations, per-step seeds), recorded in meta.json:
# 2 = positions seeded by (seed, position) with whole-budget loaders (noble_cli/seeding.py, data/resumable.py).
DATA_STREAM = 2


def prepare_folder(cfg: RunConfig, folder: RunFolder, resume: bool, overwrite: bool) -> str:
    """`folder_state` and its side effects (global rank 0 only): returns "new", "resume" or "done"."""
    state = folder_state(cfg, folder, resume, overwrite)
    if state in ("overwrite", "restart"):
        shutil.rmtree(folder.path)
        state = "new"
    if state == "resume":
        for leftover in folder.checkpoint_dir.iterdir():  # a checkpoint write cut off by a kill (can be gigabytes)
            if is_stale_temp(leftover):
                leftover.unlink()
    return state


def decide_folder(trainer: L.Trainer, cfg: RunConfig, folder: RunFolder, resume: bool, overwrite: bool) -> str:
    """Global rank 0 decides what happens to the run folder (and acts on it); every other process follows.

    Processes that Lightning's launcher spawns inherit the first process's decision (`PREPARED_ENV`). The ranks
    of a launch that starts all processes at once (srun, torchrun) get it through Lightning's broadcast: the
    process group that `fit` would set up is set up here instead, so a refusal, "done" or "resume" is the same on
    every rank and no rank looks at a folder that rank 0 may be changing."""
    inherited = decided_by_parent(folder.path)
    if inherited:
        return inherited
    together = trainer.world_size > 1 and trainer.strategy.cluster_environment.creates_processes_externally
    if together:
        trainer.strategy.setup_environment()
    outcome: tuple[str, str] = ("", "")
    if trainer.is_global_zero:
        try:
            outcome = (prepare_folder(cfg, folder, resume, overwrite), "")
        except NobleError as refusal:
            outcome = ("refused", str(refusal))
    if together:
        outcome = trainer.strategy.broadcast(outcome)
    state, refusal = outcome
    if refusal:
        raise NobleError(refusal)
    return state


def trainer_or_error(**kwargs) -> L.Trainer:
    """L.Trainer, with Lightning's own refusals of a device, strategy or precision as one-line errors."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NobleError(f"invalid trainer settings (accelerator={kwargs.get('accelerator')!r}, devices="
                         f"{kwargs.get('devices')!r}, num_nodes={kwargs.get('num_nodes')!r}, strategy="
                         f"{kwargs.get('strategy')!r}, precision={kwargs.get('precision')!r}): {first}") from None


def check_trainer_options(cfg: RunConfig) -> None:
    """Lightning's checks of accelerator/devices/strategy/precision, before anything touches the run folder."""
    t = cfg.trainer
    on_gpu = t.uses_cuda()
    trainer_or_error(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
                     precision=precision_for(cfg, on_gpu), logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def build_trainer(cfg: RunConfig, module, folder: RunFolder, recorder: RunRecorder, progress: bool,
                  extra_callbacks=()) -> L.Trainer:
    t = cfg.trainer
    on_gpu = t.uses_cuda()
    callbacks = [
        KernelSelfCheck(folder),  # first: the fused kernels are checked (and maybe replaced) before anything runs
        recorder,
        ModelCheckpoint(dirpath=folder.checkpoint_dir, filename="best", monitor=recorder.metric.name,
                        mode=recorder.metric.mode,
                        save_top_k=1, save_last=True, enable_version_counter=False, auto_insert_metric_name=False),
    ]
    callbacks += list(extra_callbacks)
    if progress:
        callbacks.append(progress_callback(recorder))
    return trainer_or_error(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=strategy_for(cfg, module), precision=precision_for(cfg, on_gpu),
        # under manual optimization (the VQGAN) the task clips its own gradients: Lightning refuses to
        gradient_clip_val=(cfg.optim.grad_clip or None) if module.automatic_optimization else None,
        accumulate_grad_batches=t.accumulate,
        val_check_interval=t.eval_every * t.accumulate, check_val_every_n_epoch=None,
        limit_val_batches=t.eval_batches, num_sanity_val_steps=0, logger=False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], default_root_dir=folder.path, enable_model_summary=False,
        enable_progress_bar=progress, log_every_n_steps=t.log_every, use_distributed_sampler=False,
    )


def evaluate_and_checkpoint_the_end(trainer, module, datamodule, folder: RunFolder, recorder: RunRecorder) -> None:
    """... and checkpointed: ModelCheckpoint only saves inside `fit`, whose evaluations fall every eval_every steps."""
    trainer.validate(module, datamodule=datamodule, verbose=False)
    # full checkpoints (optimizer and loop state: a later resume continues from them), as ModelCheckpoint's are;
    # saying so keeps Lightning from logging that it chose for us
    trainer.save_checkpoint(folder.last_checkpoint, weights_only=False)
    if recorder.summary().get("best_step") == trainer.global_step:
        trainer.save_checkpoint(folder.checkpoint_dir / "best.ckpt", weights_only=False)


def train(
    cfg: RunConfig,
    out: Path = Path("results"),
    resume: bool = False,
    overwrite: bool = False,
    run_dir: Path | None = None,
    progress: bool = True,
    callbacks=(),
) -> TrainResult:
    """Train one run into `<out>/runs/<run-id>/` (or `run_dir`), resuming or refusing to overwrite as asked."""
    if resume and overwrite:
        raise NobleError("--resume and --overwrite contradict each other: continue the run, or start it again")
    rid = run_id(cfg)
    folder = RunFolder(run_dir or out / "runs" / rid)
    # Lightning's start-up banner (GPU/TPU available, tips) is noise next to our own summary line.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    check_trainer_options(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    task = get_task(cfg.task)
    module = task.build_module(cfg)
    recorder = RunRecorder(folder, untimed_steps=cfg.trainer.untimed_steps, log_every=cfg.trainer.log_every,
                           metric=task.metric)
    trainer = build_trainer(cfg, module, folder, recorder, progress, [*callbacks, FlopsProbe(folder)])
    state = decide_folder(trainer, cfg, folder, resume, overwrite)
    if state == "done":
        return TrainResult(folder.path, folder.read_json(folder.summary_path), folder.read_json(folder.meta_path),
                           already_done=True)
    mark_decided(folder.path, state)  # inherited by the processes that fit spawns
    try:
        return _train_prepared(cfg, task, module, trainer, recorder, folder, rid, state, Path(out))
    finally:
        os.environ.pop(PREPARED_ENV, None)  # a later train() in this process decides afresh


def _train_prepared(cfg: RunConfig, task, module, trainer: L.Trainer, recorder: RunRecorder, folder: RunFolder,
                    rid: str, state: str, out: Path) -> TrainResult:
    """The run itself, once the folder's state is decided: fit, finish the end, summarise."""
    datamodule = task.build_datamodule(cfg)
    if cfg.schedule.warmup_steps >= cfg.trainer.max_steps and rank_zero_only.rank == 0:
        make_console(stderr=True).print(
            f"[yellow]note:[/] schedule.warmup_steps ({cfg.schedule.warmup_steps}) >= trainer.max_steps "
            f"({cfg.trainer.max_steps}): this run never leaves the learning-rate warm-up")
    if cfg.trainer.compile:
        module.model.compile()  # in place: parameter names (and checkpoints) stay those of the plain model
    meta = folder.read_json(folder.meta_path)
    data_identity = module.data_identity()
    # (folders from before these keys existed in meta.json are not checked)
    if state == "resume" and meta.get("world_size", trainer.world_size) != trainer.world_size:
        raise NobleError(  # batch_size is per device: another device count would train on other batches
            f"cannot resume {folder.path} on {trainer.world_size} device(s): it was started on "
            f"{meta.get('world_size', 1)}; resume with the same --devices/--num-nodes")
    if state == "resume" and meta.get("data_stream") != DATA_STREAM and rank_zero_only.rank == 0:
        make_console(stderr=True).print(
            f"[yellow]note:[/] {folder.path} was started by an older noble whose batches, augmentations and "
            "dropout were drawn differently: from here on the run sees different draws than it would have")
    if state == "resume" and "data_identity" in meta and meta["data_identity"] != data_identity:
        raise NobleError(f"cannot resume {folder.path}: its data changed since it started ({meta.get('data_identity')}"
                         f" then, {data_identity} now); use --overwrite to start it again")
    if trainer.is_global_zero:
        folder.write_config(cfg)
        if not meta:
            meta = folder.write_meta(cfg, rid, module.params.total, module.params.branch,
                                     world_size=trainer.world_size, data_identity=data_identity,
                                     data_stream=DATA_STREAM, metric=task.metric.to_meta(),
                                     **module.implementation.meta())
        atomic_write_text(folder.checkpoint_dir / "hyperparameters.yaml", to_yaml(cfg))
        if cfg.trainer.logger:  # mirrors of the run folder, once it is decided and described
            recorder.trackers = trackers.open_trackers(
                cfg.trainer.logger, out=out, run_id=rid, meta=meta, fresh=state == "new",
                params=trackers.run_params(cfg.to_dict(), meta))

    with warnings.catch_warnings():
        # Lightning's warnings that do not apply here; among them "dataloader is not resumable": ours are, by
        # position (the batches are a function of the seed and the step), not by a state_dict.
        warnings.filterwarnings("ignore", message=".*(does not have many workers|IterableDataset|exists and is not "
                                                  "empty|LeafSpec|dataloader is not resumable).*")
        try:
            trainer.fit(module, datamodule=datamodule,
                        ckpt_path=str(folder.last_checkpoint) if state == "resume" else None)
            if trainer.global_step % cfg.trainer.eval_every:  # the budget's end is always evaluated ...
                evaluate_and_checkpoint_the_end(trainer, module, datamodule, folder, recorder)
        except DivergedError:
            raise
        except SystemExit:  # Lightning turns Ctrl-C into exit(1) after its graceful shutdown
            raise InterruptedRun(
                f"interrupted at step {trainer.global_step}; continue with the same command and --resume "
                f"(run folder {folder.path})"
            ) from None
    recorder.status = "completed"
    summary = recorder.finish(trainer)
    # meta.json as the self-check left it (the implementation that actually ran)
    return TrainResult(folder.path, summary, folder.read_json(folder.meta_path) or meta)

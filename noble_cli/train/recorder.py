"""Lightning pieces that keep the run folder: per-step metrics, the summary, divergence and atomic checkpoints.

Why not Lightning's CSVLogger: it deletes metrics.csv when a run resumes into the same folder, writes train and
eval rows separately, and rewrites the file in place. The run folder needs one row per step, kept across resumes,
written atomically.
"""

from __future__ import annotations

import math
import os
import pickle
import time
import zipfile
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from noble_cli.atomic import temp_name
from noble_cli.errors import NobleError
from noble_cli.tasks.spec import Metric
from noble_cli.train.run_folder import RunFolder

FLUSH_SECONDS = 30.0  # metrics.csv is rewritten at most this often (and at every evaluation and at the end)

# Peak dense bf16 tensor-core throughput (vendor datasheets, no sparsity), for MFU. Matched against
# torch.cuda.get_device_name in this order, as whole words: "L4" must not catch "L40S", nor "A10" "A100", nor the
# H100 SXM figure an "H100 PCIe". Cards not listed report no MFU.
PEAK_BF16_FLOPS = {
    r"H100\b.*\bPCIe": 756e12, r"H100\b.*\bNVL": 835e12, r"H100": 989e12, r"G?H200": 989e12, r"A100": 312e12,
    r"L40S": 362e12, r"L4": 121e12, r"A10": 125e12, r"4090": 165e12,
}


def peak_flops(name: str | None = None) -> float | None:
    """The card's peak bf16 FLOP/s (device 0 unless `name` is given), or None when unknown."""
    import re

    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)


class DivergedError(NobleError):
    """The loss became NaN or infinite."""


class CorruptCheckpointError(NobleError):
    """A checkpoint that cannot be read back (truncated, overwritten, not a checkpoint)."""


def _checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint holds, or None when it cannot be read. mmap: the tensors are not read."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable file is "not usable"
        return None


def corrupt_checkpoint_error(path: Path, error: BaseException) -> CorruptCheckpointError:
    """Name the bad checkpoint and offer the run's other one (best.ckpt for last.ckpt and the reverse)."""
    path = Path(path)
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    other = path.with_name("best.ckpt" if path.name != "best.ckpt" else "last.ckpt")
    step = _checkpoint_step(other) if other.exists() else None
    run = path.parent.parent
    if step is not None:
        offer = (f"resume from the previous one, {other.name} (step {step}): mv {path} {path}.corrupt && cp {other} "
                 f"{path}, then the same command; or start the run again with --overwrite")
    else:
        offer = f"no other readable checkpoint in {path.parent}: start the run again with --overwrite"
    return CorruptCheckpointError(f"checkpoint {path} of run {run.name} is unreadable ({type(error).__name__}: "
                                  f"{first}); {offer}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file, then rename: a kill mid-save leaves the previous checkpoint intact. A
    checkpoint that cannot be loaded is one error naming it and the run's other checkpoint."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except OSError as e:  # a full disk: Lightning's writer names its own temporary file, not the checkpoint
            Path(tmp).unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path, *args, **kwargs):
        if not Path(path).exists():
            return super().load_checkpoint(path, *args, **kwargs)
        try:
            checkpoint = super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            if "weights only" in str(e).lower():  # torch's safe-loading refusal: the file is fine
                raise
            raise corrupt_checkpoint_error(Path(path), e) from None
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise corrupt_checkpoint_error(Path(path), ValueError("not a Lightning checkpoint: no state_dict"))
        return checkpoint


def run_summary(metrics: pd.DataFrame, untimed_steps: int, status: str, metric: Metric = Metric()) -> dict:
    """summary.json from the metrics table (definitions in docs/run-folder.md): the best and final value of the
    task's metric, the step of the best, the median step time, the training time."""
    best_key, final_key = metric.best_key, metric.final_key
    out: dict = {"status": status, "steps": 0, "metric": metric.name, "metric_mode": metric.mode, best_key: None,
                 "best_step": None, final_key: None, "median_step_time_s": None, "train_time_s": 0.0}
    if metrics.empty:
        return out
    out["steps"] = int(metrics["step"].max())
    out["train_time_s"] = float(metrics["wallclock_s"].max())
    times = metrics.loc[metrics["step"] > untimed_steps, "step_time_s"].dropna()
    if times.empty:
        times = metrics["step_time_s"].dropna()
    out["median_step_time_s"] = float(times.median()) if not times.empty else None
    if metric.name in metrics:
        evals = metrics.dropna(subset=[metric.name])
        if not evals.empty:
            scores = evals[metric.name].map(metric.as_lower_is_better)
            best = evals.loc[scores.idxmin()]
            out.update({best_key: float(best[metric.name]), "best_step": int(best["step"]),
                        final_key: float(evals.iloc[-1][metric.name])})
            if "eval_top1" in evals:
                out["best_eval_top1"] = float(evals["eval_top1"].max())
            if "eval_bpb" in evals:  # LMs' bits per byte: lower is better, comparable across tokenizers
                bpb = evals["eval_bpb"].dropna()
                if not bpb.empty:
                    out.update(best_eval_bpb=float(bpb.min()), final_eval_bpb=float(bpb.iloc[-1]))
    return out


class RunRecorder(L.Callback):
    """Times every optimizer step (evaluation excluded), logs throughput, writes metrics.csv and summary.json."""

    def __init__(self, folder: RunFolder, untimed_steps: int = 5, log_every: int = 1, metric: Metric = Metric()):
        self.folder = folder
        self.untimed_steps = untimed_steps
        self.metric = metric
        self.log_every = log_every
        self._resumed = False
        self.rows: dict[int, dict] = {}
        self.wallclock = 0.0
        self.items = 0
        self._loss_sum = 0.0
        self._lr = float("nan")
        self._flops_per_item: float | None = None
        self._peak: float | None = None
        self._last_flush_time = time.perf_counter()
        self._t0: float | None = None
        self._started = False  # training began (on_train_start): the folder's files are this process's to write
        self.status = "running"
        self.trackers = None  # noble_cli.trackers.Trackers: a copy of every row, set by train() on global rank 0
        self._for_trackers: list[tuple[int, dict]] = []  # rows not yet sent: they go with each metrics.csv flush

    def setup(self, trainer, pl_module, stage):
        # Once, before a strategy wraps (and FSDP shards) the model: its FLOPs per item do not change. MFU is
        # against the bf16 peak, so only for bf16 runs.
        self._flops_per_item = pl_module.flops_per_item()
        self._peak = peak_flops() if "bf16" in str(trainer.precision) else None

    # --- state across resumes ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._restore(trainer.global_step)  # > 0 when resumed (restored by now, unlike on_fit_start)
        self._started = True
        self._flush(trainer, force=True)

    def _restore(self, step: int) -> None:
        """The rows of the run so far, up to the checkpoint's step (a resume repeats the steps after it)."""
        old = self.folder.read_metrics()
        if not old.empty and step > 0:
            old = old[old["step"] <= step]
            self.rows = {int(r["step"]): {k: v for k, v in r.items() if pd.notna(v)} for r in old.to_dict("records")}
            self.wallclock = float(old["wallclock_s"].max()) if "wallclock_s" in old and len(old) else 0.0
            self._resumed = True

    # --- timing -------------------------------------------------------------------------------------------------
    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:  # the first step, or the first after an evaluation and its checkpoint
            self._sync(pl_module)
            self._t0 = time.perf_counter()
        if batch_idx % trainer.accumulate_grad_batches == 0:
            group = trainer.optimizers[0].param_groups[0]  # the lr this step uses: the schedule steps after it
            self._lr = group["lr"] / group.get("lr_mult", 1.0)
        self.items += pl_module.items_in(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Summed as a tensor (each micro-batch's loss comes divided by the accumulation count): reading it back at
        # every micro-batch would make the CPU wait for the GPU each time.
        self._loss_sum = self._loss_sum + loss.detach()
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # not an optimizer step yet
        self._sync(pl_module)
        now = time.perf_counter()
        dt = now - self._t0
        self._t0 = now
        step = trainer.global_step
        loss_sum, self._loss_sum = self._loss_sum, 0.0
        if trainer.world_size > 1:  # every rank logs, and decides divergence on, the same mean loss
            loss_sum = trainer.strategy.reduce(torch.as_tensor(loss_sum, device=pl_module.device), reduce_op="mean")
        train_loss = float(loss_sum)
        if not math.isfinite(train_loss):
            self.status = "diverged"
            raise DivergedError(
                f"loss became {train_loss} at step {step}; stopped. The metrics so far and the last good checkpoint "
                f"are in {self.folder.path}"
            )
        self.wallclock += self._charged(dt)
        items, self.items = self.items, 0
        if step % self.log_every and step != 1:
            return  # not a logged step: its time still counts in the wall-clock
        row = self.rows.setdefault(step, {"step": step})
        row.update(train_loss=train_loss, lr=self._lr, step_time_s=dt, wallclock_s=self.wallclock)
        for k, v in trainer.callback_metrics.items():  # a task's extra train_* logs (accuracy, PSNR, ...)
            if k.startswith("train_") and k != "train_loss":
                row[k] = float(v)
        if items:
            rate = items * trainer.world_size / dt
            row[f"{pl_module.items_name}_per_s"] = rate
            if self._flops_per_item and self._peak:
                row["mfu"] = self._flops_per_item * rate / (self._peak * trainer.world_size)
            pl_module.log(f"{pl_module.items_name[:3]}/s", rate, prog_bar=True)
        if self.trackers:
            self._for_trackers.append((step, dict(row)))
        if now - self._last_flush_time >= FLUSH_SECONDS:
            self._flush(trainer)
            self._t0 = time.perf_counter()  # the rewrite and the trackers are bookkeeping, not the next step's time

    def _charged(self, dt: float) -> float:
        """Wall-clock charged for a step. The first step after a resume recompiles (torch.compile, Triton
        autotuning) what the run already compiled once: it is charged at most the median step so far, so an
        interrupted run's wall-clock stays comparable with an uninterrupted one."""
        if not self._resumed:
            return dt
        self._resumed = False
        times = [r["step_time_s"] for r in self.rows.values() if r.get("step_time_s") is not None]
        return min(dt, float(pd.Series(times).median())) if times else dt

    # --- evaluation ------------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        row = self.rows.setdefault(step, {"step": step, "wallclock_s": self.wallclock})
        evals = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval_")}
        row.update(evals)
        if self.trackers:
            self._for_trackers.append((step, evals))
        self._flush(trainer, force=True)

    def on_validation_end(self, trainer, pl_module):
        # The next step's clock starts at its own batch, so evaluation and the checkpoint written after it (by
        # ModelCheckpoint, which Lightning runs after this callback) stay out of step times and wall-clock.
        self._t0 = None

    # --- the end, however it comes ---------------------------------------------------------------------------------
    def on_train_end(self, trainer, pl_module):
        self.status = "completed"

    def on_exception(self, trainer, pl_module, exception):
        if self.status == "running":
            # Ctrl-C, or SIGTERM (Lightning raises SystemExit for it, as a scheduler's preemption would send)
            self.status = "interrupted" if isinstance(exception, (KeyboardInterrupt, SystemExit)) else "failed"
        if not self._started and self.folder.metrics_path.exists():
            # failed before training began (an unreadable checkpoint, missing data) on a folder that holds a run:
            # its metrics and summary are that run's, not to be replaced by this attempt's empty ones
            self._close_trackers()
            return
        try:
            self.finish(trainer)
        except OSError:
            self._close_trackers()  # a full or read-only disk: the exception being raised already says so

    def finish(self, trainer) -> dict:
        if not self._started:  # a resume at the budget's end: Lightning trains nothing and never starts training
            self._restore(trainer.global_step)
        try:
            self._flush(trainer, force=True)
            if trainer.is_global_zero:
                summary = self.summary()
                self.folder.write_summary(summary)
                return summary
            return {}
        finally:
            self._close_trackers()

    def _close_trackers(self) -> None:
        if self.trackers:
            self.trackers.close(self.status)

    def summary(self) -> dict:
        return run_summary(self.frame(), self.untimed_steps, self.status, self.metric)

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([self.rows[k] for k in sorted(self.rows)])
        if frame.empty:
            return frame
        front = [c for c in ("step", "train_loss", self.metric.name, "lr", "step_time_s", "wallclock_s") if c in frame]
        return frame[front + [c for c in frame.columns if c not in front]]

    def _flush(self, trainer, force: bool = False) -> None:
        if not trainer.is_global_zero or not (force or self.rows):
            return
        self._last_flush_time = time.perf_counter()
        frame = self.frame()
        if not frame.empty:
            frame = frame.astype({"step": int})
            self.folder.write_metrics(frame)
        self.folder.write_summary(self.summary())
        # Trackers get the rows in batches, at the file's pace: one request a step to a remote server would slow
        # every step (and, being bookkeeping, that time would be left out of the step times).
        for step, row in self._for_trackers:
            self.trackers.log_metrics(row, step)
        self._for_trackers.clear()


"""The run folder: the contract between `noble train` and `noble report` (see docs/run-folder.md).

    <out>/runs/<run-id>/
        config.yaml     resolved config (enough to rerun)
        meta.json       git commit, versions, device, parameter counts, recipe, variant, seed, pairing keys
        metrics.csv     one row per step: step, train_loss, lr, step_time_s, tokens_per_s, wallclock_s, [mfu], eval_*
        summary.json    best_eval_loss, best_step, final_eval_loss, median_step_time_s, train_time_s, status
        checkpoints/    last.ckpt, best.ckpt (with hyperparameters.yaml beside them)

Every file is written to a temporary name in the same folder and renamed into place, so a killed run never leaves
a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from noble_cli.atomic import atomic_write_json, atomic_write_text
from noble_cli.config import RunConfig, pair_key, to_yaml, variant_key
from noble_cli.recipes import REPO_ROOT
from noble_cli.roles import BASELINE, role_of_config


def git_state(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """(commit, dirty) of the code that runs; ('unknown', False) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return "unknown", False
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10)
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def library_versions() -> dict[str, str]:
    import lightning
    import torch

    import noble_cli

    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
        "noble": noble_cli.__version__, "cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version()),
    }
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    return versions


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


STATUSES = ("running", "completed", "interrupted", "failed", "diverged")  # summary.json's `status`
FINISHED = ("completed", "diverged")  # a run that has its result (a divergence is one: retrying repeats it)


@dataclass
class RunFolder:
    path: Path

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.ckpt"

    def exists(self) -> bool:
        return self.meta_path.exists() or self.config_path.exists()

    def write_config(self, cfg: RunConfig) -> None:
        atomic_write_text(self.config_path, to_yaml(cfg))

    def write_meta(self, cfg: RunConfig, run_id: str, params_total: int, params_branch: int, world_size: int = 1,
                   data_identity: dict | None = None, **extra) -> dict:
        commit, dirty = git_state()
        meta = {
            "run_id": run_id, "recipe": cfg.recipe, "task": cfg.task, "variant": cfg.variant,
            "variant_key": variant_key(cfg), "pair_key": pair_key(cfg, world_size, data_identity), "seed": cfg.seed,
            "world_size": world_size, "data_identity": data_identity or {},
            "is_baseline": role_of_config(cfg) == BASELINE, "role": role_of_config(cfg), "max_steps": cfg.trainer.max_steps,
            "git_commit": commit, "git_dirty": dirty, "versions": library_versions(), "device": device_description(),
            "params_total": params_total, "params_branch": params_branch,
            "param_overhead": params_branch / max(1, params_total - params_branch),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **extra,
        }
        atomic_write_json(self.meta_path, meta)
        return meta

    def update_meta(self, changes: dict) -> dict:
        """meta.json with `changes` merged in (global rank 0 only, like write_meta)."""
        meta = {**self.read_json(self.meta_path), **changes}
        atomic_write_json(self.meta_path, meta)
        return meta

    def read_json(self, path: Path) -> dict:
        """A JSON object file of the folder; {} when missing or unreadable (a broken folder must not crash callers)."""
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return obj if isinstance(obj, dict) else {}

    def summary(self) -> dict:
        return self.read_json(self.summary_path)

    def read_metrics(self) -> pd.DataFrame:
        if not self.metrics_path.exists():
            return pd.DataFrame()
        return pd.read_csv(self.metrics_path)

    def write_metrics(self, frame: pd.DataFrame) -> None:
        atomic_write_text(self.metrics_path, frame.to_csv(index=False))

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

"""Training: `run.train` (one run into its folder), the recorder that keeps the folder, the folder itself."""

from __future__ import annotations

import os
from pathlib import Path

# Set while a run trains, in its process and (inherited) in the processes Lightning's DDP launcher spawns for it:
# "<run folder>::<state>", the first process's decision about the folder ("new" or "resume"). Here, not in run.py,
# so that the sweep launcher can read it without importing Lightning.
PREPARED_ENV = "NOBLE_PREPARED_RUN"


def decided_by_parent(run_dir: Path | str) -> str | None:
    """In a process Lightning's launcher spawned for this run: the state its first process decided; else None."""
    folder, sep, state = os.environ.get(PREPARED_ENV, "").rpartition("::")
    return state if sep and folder == str(run_dir) else None


def mark_decided(run_dir: Path | str, state: str) -> None:
    os.environ[PREPARED_ENV] = f"{run_dir}::{state}"

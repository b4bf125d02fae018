"""Locks, through `filelock`: one per run folder (who is training it) and one around a manifest's read-modify-write.

A run lock is an OS lock (flock) on `.locks/<run id>.lock` in the folder that holds the run folder (not inside the
run folder: `train(overwrite=True)` deletes it). The OS releases it when its holder exits, however it exits (kill -9 included), so a lock is
never stale and nothing has to guess whether a holder still lives. The holder writes who it is into
`.locks/<run id>.lock.json` for `noble ablate` to show; that file means nothing once the lock is free. The lock files stay
(removing a flock file while another process waits on it would let two processes hold "the" lock). On a cluster the
results folder must be on a file system with working flock (local disks, NFSv4, GPFS, Lustre mounted with -o flock).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
from pathlib import Path

import filelock

from noble_cli.atomic import atomic_write_json

HOST = socket.gethostname()
# How long `acquire` keeps trying: another process's `holder()` probes the lock for a moment.
_ACQUIRE_PATIENCE_S = 0.5


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on `path` (created if missing), waited for, for the duration of the block."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(path):
        yield


class RunLock:
    """`.locks/<run id>.lock` beside the run folder, held while a process trains that run."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / ".locks" / f"{self.run_dir.name}.lock"
        self.info_path = self.path.with_name(f"{self.run_dir.name}.lock.json")
        self._lock = filelock.FileLock(self.path, thread_local=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self, owner: str = "") -> bool:
        """True when this process now holds the lock; False when another process does."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire(timeout=_ACQUIRE_PATIENCE_S, poll_interval=0.05)
        except filelock.Timeout:
            return False
        atomic_write_json(self.info_path, {"pid": os.getpid(), "host": HOST, "since": now_iso(), "owner": owner})
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self.info_path.unlink(missing_ok=True)
            self._lock.release(force=True)

    def holder(self) -> dict | None:
        """The holder's record (pid, host, since, owner), or None when the run is free."""
        if self.held:
            return self._read_info()
        if not self.path.exists():
            return None
        probe = filelock.FileLock(self.path, thread_local=False)
        try:
            probe.acquire(timeout=0)
        except filelock.Timeout:
            return self._read_info()
        probe.release()
        return None

    def _read_info(self) -> dict:
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {"starting": True}  # locked, record not written yet
        return info if isinstance(info, dict) else {"starting": True}


def describe_holder(info: dict) -> str:
    if info.get("starting"):
        return "a process that is starting"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"

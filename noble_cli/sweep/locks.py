"""Locks: one per run folder (who is training it), and a short flock around read-modify-write of a manifest.

A run lock is the file `<run_dir>.lock` beside the run folder (not inside it: `train(overwrite=True)` deletes the
folder, and a lock inside would make the folder "exist" for `RunFolder.exists`). It is created with
O_CREAT|O_EXCL and holds the owner's pid, host and process start time. A lock whose owner is a dead process on this
host is stale and is taken over; a lock from another host is honoured (its process cannot be checked from here):
delete the file by hand if that machine is gone.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
from pathlib import Path

HOST = socket.gethostname()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    if Path(f"/proc/{pid}/stat").exists():
        try:  # a zombie (exited, not yet reaped) is dead for our purposes
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        except (OSError, IndexError):
            pass
    return True


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive flock on `path` (created if missing) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class RunLock:
    """`<run_dir>.lock`, held while a process trains that run."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f"{self.run_dir.name}.lock"
        self.held = False

    def read(self) -> dict | None:
        """The holder's record, or None when there is no lock file."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"unreadable": True}

    def holder(self) -> dict | None:
        """The live holder's record (pid, host, ...), or None when the run is free (no lock, or a stale one)."""
        info = self.read()
        if info is None or self.is_stale(info):
            return None
        return info

    def is_stale(self, info: dict) -> bool:
        if info.get("unreadable"):  # a crash between create and write; give a writer a few seconds
            try:
                age = _dt.datetime.now().timestamp() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            return age > 10
        if info.get("host") != HOST:
            return False
        pid = info.get("pid")
        return not (isinstance(pid, int) and pid_alive(pid, info.get("start")))

    def _create(self, record: dict) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
            f.flush()
            os.fsync(f.fileno())
        return True

    def acquire(self, owner: str = "") -> bool:
        """True when this process now holds the lock; False when a live process does."""
        record = {"pid": os.getpid(), "host": HOST, "start": _proc_start(os.getpid()), "since": now_iso(),
                  "owner": owner}
        if self._create(record):
            self.held = True
            return True
        # Taking over a stale lock happens under a guard, so two processes cannot both take it over.
        with file_lock(self.path.parent / ".locks.guard"):
            info = self.read()
            if info is not None and not self.is_stale(info):
                return False
            self.path.unlink(missing_ok=True)
            self.held = self._create(record)
        return self.held

    def release(self) -> None:
        if not self.held:
            return
        info = self.read()
        if info and info.get("pid") == os.getpid() and info.get("host") == HOST:
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def describe_holder(info: dict) -> str:
    if info.get("unreadable"):
        return "a process that is starting"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"

"""Atomic file writes: every file noble writes goes to a temporary name beside it, is fsynced, then renamed into
place, so a killed process never leaves a half-written file. Temporary names carry the writer's pid, so that a
later process can tell a dead writer's leftovers (`is_stale_temp`) from a live one's."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

T = TypeVar("T")

_TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")


def temp_name(final: Path) -> Path:
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_stale_temp(path: Path) -> bool:
    """A temporary file of ours whose writer process is gone."""
    m = _TEMP_RE.match(Path(path).name)
    return bool(m) and not _pid_alive(int(m.group(1)))


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "wb") -> Iterator:
    """Open a temp file beside `final`; on success fsync it and `os.replace` it onto `final`.

    `open` creates it with the usual permissions (umask applies), so others on a shared cluster can read results."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        # a write or fsync on a full disk names no file, an open the temporary one: name the file being written
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror or str(e), str(final)) from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def built_once(folder: Path, ready: Callable[[], bool], load: Callable[[], T], build: Callable[[], T],
               force: bool = False) -> T:
    """`load()` a cached artifact in `folder` when `ready()`, else `build()` it, under a file lock beside the folder:
    one process builds (a run's first use, `noble data prepare`), another one at the same time (a sweep's run on
    another GPU) waits for it and then finds it ready. `force` rebuilds."""
    if not force and ready():
        return load()
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not force and ready():
            return load()
        return build()

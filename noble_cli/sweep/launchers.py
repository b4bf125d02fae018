"""Running a sweep's manifest: one entry (`execute_entry`, the unit every launcher uses) and the launchers.

- `local`: one run after another, each in its own subprocess (`python -m noble_cli.sweep run-entry MANIFEST I`).
  A subprocess per run costs a few seconds of imports, but a crash (segfault, CUDA error, OOM) ends one run, not
  the sweep; GPU memory, CUDA/NCCL state, torch.compile caches and Lightning's global state start clean for every
  run; and the code path is the one SLURM array tasks and GPU workers take. A `train_fn` passed in Python runs the
  entries in this process instead (tests, notebooks).
- `gpus`: the same subprocesses, one per GPU at a time (CUDA_VISIBLE_DEVICES), output to `<sweep>/logs/`.
- `slurm`: writes `<sweep>/slurm.sh`, a job array with one task per unfinished entry, and submits it with sbatch.

An entry is done when its run folder's summary.json says completed (or diverged: a result, not retried); a run
folder that exists unfinished is resumed (train(resume=True)); a failed run is retried. The run lock makes a second
process (another sweep, another launcher) skip a run being trained, and the local launchers then wait for it.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import site
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from noble_cli import config as C
from noble_cli import trackers
from noble_cli.atomic import atomic_write_text
from noble_cli.console import format_duration, make_console
from noble_cli.errors import InterruptedRun, NobleError
from noble_cli.parsing import split_list
from noble_cli.recipes import from_dict
from noble_cli.sweep.locks import HOST, RunLock, describe_holder, now_iso
from noble_cli.sweep.manifest import (
    FINISHED,
    observe,
    read_manifest,
    read_summary,
    reconcile,
    results_root,
    run_dir_of,
    update_entry,
)
from noble_cli.sweep.progress import overview
from noble_cli.train import decided_by_parent
from noble_cli.train.run_folder import RunFolder

TRAIN_ENV = "NOBLE_SWEEP_TRAIN"  # module:function to train with instead of noble_cli.train.run.train

# run-entry exit codes
EXIT_DONE, EXIT_FAILED, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 3, 130
OUTCOME_CODES = {"done": EXIT_DONE, "skipped": EXIT_DONE, "failed": EXIT_FAILED, "busy": EXIT_BUSY,
                 "interrupted": EXIT_INTERRUPTED}

TrainFn = Callable[..., object]


def default_train() -> TrainFn:
    spec = os.environ.get(TRAIN_ENV)
    if spec:
        module, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module), attr or "train")
        except (ImportError, AttributeError) as e:
            raise NobleError(f"{TRAIN_ENV}={spec!r} cannot be imported ({e}); expected module:function") from None
    from noble_cli.train.run import train

    return train


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return msg if isinstance(exc, NobleError) else f"{type(exc).__name__}: {msg}".rstrip(": ")


def _finish(manifest: Path, index: int, t0: float, **fields) -> None:
    update_entry(manifest, index, finished_at=now_iso(), duration_s=round(time.time() - t0, 3), **fields)


def execute_entry(manifest: Path, index: int, train_fn: TrainFn | None = None, progress: bool = True,
                  console: Console | None = None, loggers: tuple[str, ...] = ()) -> str:
    """Train manifest entry `index` unless it is done or locked. Returns done, skipped, busy or failed; raises
    KeyboardInterrupt when the run was interrupted (its folder is kept; the next call resumes it). `loggers`: the
    experiment trackers of this launch (replacing the config's), grouped by the sweep's name."""
    console = console or make_console(stderr=True)
    manifest = Path(manifest)
    m = read_manifest(manifest)
    # The trackers group the run by its sweep; set for this run only (an in-process sweep trains several)
    previous_group = os.environ.get(trackers.SWEEP_ENV)
    os.environ[trackers.SWEEP_ENV] = str(m.get("name") or "")
    try:
        return _execute_entry(manifest, index, m, train_fn, progress, console, C.parse_loggers(loggers))
    finally:
        if previous_group is None:
            os.environ.pop(trackers.SWEEP_ENV, None)
        else:
            os.environ[trackers.SWEEP_ENV] = previous_group


def _execute_entry(manifest: Path, index: int, m: dict, train_fn: TrainFn | None, progress: bool, console: Console,
                   loggers: tuple[str, ...]) -> str:
    n = len(m["runs"])
    if not 0 <= index < n:
        raise NobleError(f"run index {index} is out of range for sweep {m.get('name')!r}: valid 0..{n - 1}")
    e = m["runs"][index]
    out = results_root(manifest)
    run_dir = run_dir_of(manifest, e)

    def entry_config() -> C.RunConfig:
        cfg = from_dict(e["config"])
        if loggers:  # not part of the run's identity (not hashed): the manifest's config stays as it was
            cfg.trainer.logger = loggers
        return cfg

    def finished() -> bool:
        s = read_summary(run_dir).get("status")
        if s in FINISHED:
            if e.get("status") != "done":
                update_entry(manifest, index, status="done", outcome=s, error=None)
            return True
        return False

    if decided_by_parent(run_dir):
        # a process Lightning's DDP launcher spawned from this entry's own run: the lock and the manifest are the
        # first process's; this one only trains alongside it
        (train_fn or default_train())(entry_config(), out=out, resume=True, run_dir=run_dir, progress=False)
        return "done"
    if finished():
        return "skipped"
    lock = RunLock(run_dir)
    if not lock.acquire(owner=f"sweep {m.get('name')} #{index}"):
        holder = lock.holder() or {}
        console.print(f"[yellow]skipped[/] {e['run_id']}: being trained by {describe_holder(holder)}")
        return "busy"
    try:
        if finished():  # finished by another process between the check and the lock
            return "skipped"
        cfg = entry_config()
        if C.run_id(cfg) != e["run_id"]:
            update_entry(manifest, index, status="failed",
                         error="the stored config no longer hashes to its run id (the config schema changed)")
            raise NobleError(f"manifest entry {index} of {manifest}: its config no longer hashes to run id "
                             f"{e['run_id']} (the config schema changed); run the ablate command again with --force")
        resume = RunFolder(run_dir).exists()
        update_entry(manifest, index, status="running", attempts=int(e.get("attempts") or 0) + 1,
                     started_at=now_iso(), finished_at=None, host=HOST, pid=os.getpid(), error=None)
        t0 = time.time()
        train = train_fn or default_train()
        try:
            result = train(cfg, out=out, resume=resume, run_dir=run_dir, progress=progress)
        except KeyboardInterrupt:
            _finish(manifest, index, t0, status="pending", error="interrupted; resumes on the next run")
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
            s = read_summary(run_dir).get("status")
            if s == "diverged":
                _finish(manifest, index, t0, status="done", outcome="diverged", error=_one_line(exc))
                console.print(f"[yellow]diverged[/] {e['run_id']}: {escape(_one_line(exc))}")
                return "done"
            if s == "interrupted" or isinstance(exc, InterruptedRun):
                _finish(manifest, index, t0, status="pending", error="interrupted; resumes on the next run")
                raise KeyboardInterrupt from exc
            _finish(manifest, index, t0, status="failed", error=_one_line(exc))
            if not isinstance(exc, NobleError):
                console.print(traceback.format_exc(), markup=False, highlight=False)
            console.print(f"[bold red]failed[/] {e['run_id']}: {escape(_one_line(exc))}", highlight=False)
            return "failed"
        summary = getattr(result, "summary", None) or {}
        outcome = summary.get("status") or read_summary(run_dir).get("status") or "completed"
        _finish(manifest, index, t0, status="done", outcome=outcome, error=None)
        return "done"
    finally:
        lock.release()


# --- subprocess per run ---------------------------------------------------------------------------------------------
def entry_argv(manifest: Path, index: int | str, progress: bool, python: str = sys.executable,
               loggers: tuple[str, ...] = ()) -> list[str]:
    return [python, "-m", "noble_cli.sweep", "run-entry", str(Path(manifest).resolve()), str(index),
            "--progress" if progress else "--no-progress", *[a for name in loggers for a in ("--logger", name)]]


def _after_child(manifest: Path, index: int, rc: int | None, pid: int) -> str:
    """The outcome of a child from its exit code; a child that died without recording it gets recorded here."""
    e = read_manifest(manifest)["runs"][index]
    if e.get("status") == "running" and e.get("pid") == pid:
        if rc in (EXIT_INTERRUPTED, -2, None):
            update_entry(manifest, index, status="pending", error="interrupted; resumes on the next run")
        else:
            update_entry(manifest, index, status="failed", finished_at=now_iso(),
                         error=f"the run's process exited with code {rc} without recording a result")
        return "interrupted" if rc in (EXIT_INTERRUPTED, -2, None) else "failed"
    if rc == EXIT_DONE:
        return "done"
    if rc == EXIT_BUSY:
        return "busy"
    if rc in (EXIT_INTERRUPTED, -2):
        return "interrupted"
    return "failed"


def _stop(proc: subprocess.Popen, grace_s: float) -> int | None:
    """Wait for a child that got the same Ctrl-C to save and exit; terminate it after `grace_s`."""
    try:
        return proc.wait(timeout=grace_s)
    except (KeyboardInterrupt, subprocess.TimeoutExpired):
        proc.terminate()
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a run's subprocess: it imports the noble_cli this process runs, not another copy.

    `python -m` puts the working directory first on sys.path, so a sweep started from a folder holding a different
    noble_cli (a second checkout beside a pip-installed one) would train its runs with that code. PYTHONSAFEPATH
    (Python >= 3.11) drops the working directory; PYTHONPATH puts this package's root first when it is a source
    checkout (a site-packages folder is found anyway, and on PYTHONPATH it would come before the standard library).
    """
    root = str(Path(__file__).resolve().parents[2])
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    if root not in {*site.getsitepackages(), site.getusersitepackages()}:
        path.insert(0, root)
    return {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join(path), **extra}


def run_subprocess(manifest: Path, index: int, progress: bool, env: dict | None = None, stdout=None,
                   loggers: tuple[str, ...] = ()) -> str:
    proc = subprocess.Popen(entry_argv(manifest, index, progress, loggers=loggers), env=child_env(**(env or {})),
                            stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        rc = _stop(proc, grace_s=120)
        _after_child(manifest, index, rc, proc.pid)
        raise
    outcome = _after_child(manifest, index, rc, proc.pid)
    if outcome == "interrupted":
        raise KeyboardInterrupt
    return outcome


# --- local: one after another ---------------------------------------------------------------------------------------
def _pending(manifest: Path) -> tuple[list[int], list[int]]:
    """(to run, locked by another process) entry indices, in manifest order."""
    m = read_manifest(manifest)
    todo, busy = [], []
    for i, e in enumerate(m["runs"]):
        state, _ = observe(manifest, e)
        if state == "running":
            busy.append(i)
        elif state != "done":
            todo.append(i)
    return todo, busy


def _claimable(manifest: Path, i: int, outcomes: dict[str, list[int]], busy: list[int]) -> dict | None:
    """The fresh manifest if entry i should start now; None (recorded as skipped or busy) if it is done or running."""
    m = read_manifest(manifest)
    state, _ = observe(manifest, m["runs"][i])
    if state == "done":
        outcomes["skipped"].append(i)
        return None
    if state == "running":
        busy.append(i)
        return None
    return m


def run_local(manifest: Path, train_fn: TrainFn | None = None, console: Console | None = None,
              progress: bool = True, wait: bool = True, poll_s: float = 10.0, in_process: bool | None = None,
              loggers: tuple[str, ...] = ()) -> dict:
    """Train every unfinished entry, one at a time. In-process when `train_fn` is given, else a subprocess each.

    Returns {outcome: [indices]} (done, skipped, failed, busy)."""
    console = console or make_console()
    in_process = train_fn is not None if in_process is None else in_process
    reconcile(manifest)
    todo, busy = _pending(manifest)
    outcomes: dict[str, list[int]] = {"done": [], "skipped": [], "failed": [], "busy": []}
    waited_note = ""
    while True:
        for i in todo:
            m = _claimable(manifest, i, outcomes, busy)
            if m is None:
                continue
            console.print(overview(manifest, m, current=i, note=waited_note, plain=not console.is_terminal))
            if in_process:
                outcome = execute_entry(manifest, i, train_fn, progress, console, loggers=loggers)
            else:
                outcome = run_subprocess(manifest, i, progress, loggers=loggers)
            if outcome == "busy":
                busy.append(i)
            else:
                outcomes[outcome].append(i)
        if not busy:
            break
        if not wait:
            outcomes["busy"] = busy
            break
        m = read_manifest(manifest)
        holders = [describe_holder(RunLock(run_dir_of(manifest, m["runs"][i])).holder() or {}) for i in busy]
        console.print(f"[yellow]waiting[/] for {len(busy)} run(s) being trained by other processes "
                      f"({holders[0]}{', ...' if len(holders) > 1 else ''}); Ctrl-C to stop waiting")
        while all(RunLock(run_dir_of(manifest, m["runs"][i])).holder() is not None for i in busy):
            time.sleep(poll_s)
        todo = [i for i in busy if RunLock(run_dir_of(manifest, m["runs"][i])).holder() is None]
        busy = [i for i in busy if i not in todo]
        waited_note = "picked up after another process released it"
    return outcomes


# --- gpus: one subprocess per GPU -----------------------------------------------------------------------------------
def parse_gpus(text: str | None) -> list[str]:
    if text:
        gpus = split_list(text)
        if not gpus or not all(g.isdigit() or g.startswith(("GPU-", "MIG-")) for g in gpus):
            raise NobleError(f"malformed --gpus {text!r}; expected comma-separated GPU indices, e.g. 0,1,2,3")
        return list(dict.fromkeys(gpus))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return split_list(visible)
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        n = 0
    if n == 0:
        raise NobleError("--launcher gpus found no GPU; pass --gpus 0,1,... or use --launcher local")
    return [str(i) for i in range(n)]


class _LogLines:
    """Live's stand-in where the console is a log file: Live would only write its last frame there; a line per
    run started and finished says what happened, and when."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, renderable) -> None:
        pass


def run_gpus(manifest: Path, gpus: list[str], console: Console | None = None, wait: bool = True,
             poll_s: float = 1.0, loggers: tuple[str, ...] = ()) -> dict:
    """Each GPU trains one run at a time (CUDA_VISIBLE_DEVICES=<gpu>), logs in `<sweep>/logs/<i>-<run id>.log`."""
    console = console or make_console()
    lines = not console.is_terminal
    reconcile(manifest)
    manifest = Path(manifest)
    logs = manifest.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queue, busy = _pending(manifest)
    outcomes: dict[str, list[int]] = {"done": [], "skipped": [], "failed": [], "busy": []}
    active: dict[str, tuple[int, subprocess.Popen, object, float, Path]] = {}

    def view():
        m = read_manifest(manifest)
        table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("gpu", "#", "variant", "seed", "elapsed", "log"):
            table.add_column(col)
        for gpu, (i, _, _, t0, log) in active.items():
            e = m["runs"][i]
            table.add_row(gpu, str(i), escape(str(e["variant"])), str(e["seed"]), format_duration(time.time() - t0),
                          escape(str(log)))
        note = f"waiting for {len(busy)} run(s) locked by other processes" if busy and not queue else ""
        return Group(overview(manifest, m, parallel=len(gpus), note=note), table)

    def reap(gpu: str) -> None:
        i, proc, fh, t0, _ = active.pop(gpu)
        fh.close()
        outcome = _after_child(manifest, i, proc.returncode, proc.pid)
        if lines:
            console.print(f"finished #{i} on GPU {gpu}: {outcome} after {format_duration(time.time() - t0)}",
                          highlight=False, markup=False)
        if outcome == "busy":
            busy.append(i)
        elif outcome in outcomes:
            outcomes[outcome].append(i)
        else:
            outcomes["failed"].append(i)

    try:
        with _LogLines() if lines else Live(view(), console=console, refresh_per_second=2, transient=False) as live:
            while queue or active or (busy and wait):
                for gpu in gpus:
                    if gpu in active or not queue:
                        continue
                    i = queue.pop(0)
                    m = _claimable(manifest, i, outcomes, busy)
                    if m is None:
                        continue
                    log = logs / f"{i:04d}-{m['runs'][i]['run_id']}.log"
                    fh = open(log, "a")
                    # progress on: the run's output is a log file, where it prints a line every few seconds
                    proc = subprocess.Popen(entry_argv(manifest, i, progress=True, loggers=loggers),
                                            env=child_env(CUDA_VISIBLE_DEVICES=gpu),
                                            stdout=fh, stderr=subprocess.STDOUT)
                    active[gpu] = (i, proc, fh, time.time(), log)
                    if lines:
                        e = m["runs"][i]
                        console.print(f"started #{i} on GPU {gpu}: {e['variant']} seed {e['seed']} "
                                      f"({e['run_id']}), log {log}", highlight=False, markup=False)
                for gpu in list(active):
                    if active[gpu][1].poll() is not None:
                        reap(gpu)
                if busy and wait and not queue:
                    m = read_manifest(manifest)
                    freed = [i for i in busy if RunLock(run_dir_of(manifest, m["runs"][i])).holder() is None]
                    queue.extend(freed)
                    busy[:] = [i for i in busy if i not in freed]
                if not wait and not queue and not active:
                    break
                live.update(view())
                time.sleep(poll_s)
            live.update(view())
        if lines:
            console.print(overview(manifest, read_manifest(manifest), parallel=len(gpus), plain=True))
    except KeyboardInterrupt:
        for gpu, (i, proc, fh, _, _) in list(active.items()):
            proc.returncode = _stop(proc, grace_s=120)
            fh.close()
            _after_child(manifest, i, proc.returncode, proc.pid)
        raise
    outcomes["busy"] = busy
    return outcomes


# --- slurm: a job array ---------------------------------------------------------------------------------------------
def compress_indices(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> '0-2,5,7-8'."""
    parts, start, prev = [], None, None
    for i in sorted(set(indices)):
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


def _slurm_line(opt: str) -> tuple[str, str]:
    """'partition=gpu' / '--partition=gpu' / '-p gpu' -> ('partition' or '-p', '#SBATCH ...')."""
    opt = opt.strip()
    if opt.startswith("#SBATCH"):
        opt = opt[len("#SBATCH"):].strip()
    if not opt:
        raise NobleError("empty --slurm-opt; expected e.g. --slurm-opt partition=gpu --slurm-opt time=04:00:00")
    if not opt.startswith("-"):
        opt = f"--{opt}"
    key = opt.lstrip("-").split("=", 1)[0].split()[0]
    if key == "array":
        raise NobleError("--slurm-opt array=... is not allowed: the job array comes from the sweep manifest")
    return key, f"#SBATCH {opt}"


def write_slurm_script(manifest: Path, slurm_opts: list[str] | None = None, python: str = sys.executable,
                       workdir: Path | None = None, loggers: tuple[str, ...] = ()) -> tuple[Path, str | None]:
    """Write `<sweep>/slurm.sh` for the unfinished entries; returns (path, array spec or None when all are done)."""
    manifest = Path(manifest).resolve()
    m = read_manifest(manifest)
    todo = [i for i, e in enumerate(m["runs"]) if observe(manifest, e)[0] != "done"]
    user = [_slurm_line(o) for o in slurm_opts or []]
    user_keys = {k for k, _ in user}
    logs = manifest.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    lines = [
        "#!/bin/bash",
        f"# NOBLE sweep {m['name']}: {m['ablation']} on {m['recipe']}, {len(m['runs'])} runs "
        f"({len(todo)} unfinished when written, {now_iso()}).",
        f"# Each array task trains manifest entry $SLURM_ARRAY_TASK_ID of {manifest};",
        "# finished runs are skipped, interrupted ones resume from their last checkpoint. Regenerate with the same",
        "# `noble ablate ... --launcher slurm` command.",
    ]
    if "job-name" not in user_keys and "J" not in user_keys:
        lines.append(f"#SBATCH --job-name=noble-{m['name']}")
    lines.append(f"#SBATCH --array={compress_indices(todo) if todo else '0'}")
    if "output" not in user_keys and "o" not in user_keys:
        lines.append(f"#SBATCH --output={logs}/%A_%a.out")
    lines += [line for _, line in user]
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(workdir or Path.cwd()))}",
        # progress stays on: in a log file a run prints a progress line every few seconds, not a bar
        f"exec {shlex.quote(python)} -m noble_cli.sweep run-entry {shlex.quote(str(manifest))} "
        '"${SLURM_ARRAY_TASK_ID}"' + "".join(f" --logger {name}" for name in loggers),
        "",
    ]
    path = manifest.parent / "slurm.sh"
    atomic_write_text(path, "\n".join(lines))
    path.chmod(0o755)
    return path, (compress_indices(todo) if todo else None)


def submit_slurm(script: Path, console: Console) -> bool:
    """sbatch the script when sbatch exists; otherwise say how. True when submitted."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        console.print(f"sbatch is not on PATH; submit on the cluster with:\n  sbatch {shlex.quote(str(script))}")
        return False
    r = subprocess.run([sbatch, str(script)], capture_output=True, text=True)
    if r.returncode != 0:
        first = (r.stderr or r.stdout).strip().splitlines()
        raise NobleError(f"sbatch {script} failed: {first[0] if first else f'exit code {r.returncode}'}")
    console.print(r.stdout.strip() or f"submitted {script}")
    return True

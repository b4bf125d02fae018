"""The sweep manifest: `<out>/sweeps/<name>/manifest.json`, every expanded run with its state.

    {
      "version": 1, "name": ..., "ablation": ..., "recipe": ..., "definition": {the options},
      "definition_hash": hash of the sorted run ids, "created_at", "updated_at", "argv",
      "runs": [{"index", "run_id", "variant", "role", "group", "seed", "config": {resolved config},
                "run_dir": "runs/<run-id>" (relative to the results folder), "status": pending|running|done|failed,
                "attempts", "started_at", "finished_at", "duration_s", "outcome" (summary.json status),
                "error", "host", "pid", "params_total", "params_branch"}, ...]
    }

It is written atomically (temp file + fsync + os.replace) and every read-modify-write happens under a flock on
`.manifest.lock` beside it, so the runs of one sweep (subprocesses, GPU workers, SLURM array tasks) can each record
their own state. The truth about a run is its run folder: `status` is reconciled with summary.json and the run lock
whenever a sweep starts or a run is picked up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from noble_cli import config as C
from noble_cli.atomic import atomic_write_json
from noble_cli.errors import NobleError
from noble_cli.sweep.locks import HOST, RunLock, file_lock, now_iso
from noble_cli.train.run_folder import FINISHED, RunFolder

MANIFEST_VERSION = 1


def sweep_dir(out: Path, name: str) -> Path:
    return Path(out) / "sweeps" / name


def manifest_path(out: Path, name: str) -> Path:
    return sweep_dir(out, name) / "manifest.json"


def results_root(manifest: Path) -> Path:
    """`<out>` from `<out>/sweeps/<name>/manifest.json`."""
    return Path(manifest).resolve().parent.parent.parent


def run_dir_of(manifest: Path, entry: dict) -> Path:
    return results_root(manifest) / entry["run_dir"]


def definition_hash(run_ids: list[str]) -> str:
    return C.digest(sorted(run_ids), 12)


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise NobleError(f"no sweep manifest at {path}; start the sweep with `noble ablate <ablation>` first")
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NobleError(f"sweep manifest {path} is unreadable ({e}); delete it to start the sweep again "
                         "(finished runs are kept in their run folders and will be skipped)") from None
    if not isinstance(m, dict) or not isinstance(m.get("runs"), list):
        raise NobleError(f"sweep manifest {path} has no 'runs' list; delete it to start the sweep again")
    for i, e in enumerate(m["runs"]):
        missing = [k for k in ENTRY_KEYS if not isinstance(e, dict) or k not in e]
        if missing or not isinstance(e.get("config"), dict):
            raise NobleError(f"sweep manifest {path}: entry {i} is malformed (missing {', '.join(missing) or 'config'}"
                             "); delete the manifest to start the sweep again (finished runs are kept and skipped)")
    return m


# What every manifest entry must hold for sweeps, launchers and the progress view to read it.
ENTRY_KEYS = ("index", "run_id", "variant", "role", "seed", "run_dir", "status", "config")


def _lock_path(path: Path) -> Path:
    return Path(path).parent / ".manifest.lock"


def update_manifest(path: Path, change: Callable[[dict], None]) -> dict:
    """Read, change (in place) and write the manifest under its lock; returns the new manifest."""
    with file_lock(_lock_path(path)):
        m = read_manifest(path)
        change(m)
        m["updated_at"] = now_iso()
        atomic_write_json(Path(path), m)
    return m


def update_entry(path: Path, index: int, **fields) -> dict:
    def change(m: dict) -> None:
        m["runs"][index].update(fields)

    return update_manifest(path, change)


def new_entry(index: int, run, created: str) -> dict:
    return {
        "index": index, "run_id": run.run_id, "variant": run.variant, "role": run.role, "group": run.group,
        "seed": run.seed, "run_dir": f"runs/{run.run_id}", "status": "pending", "attempts": 0,
        "created_at": created, "started_at": None, "finished_at": None, "duration_s": None, "outcome": None,
        "error": None, "host": None, "pid": None, "params_total": run.params_total,
        "params_branch": run.params_branch,
        "config": run.cfg.to_dict(),
    }


def build_manifest(plan, argv: list[str], old: dict | None = None) -> dict:
    """The manifest of `plan`; entries of runs already in `old` keep their state (status, attempts, times)."""
    created = now_iso()
    kept = {e["run_id"]: e for e in (old or {}).get("runs", [])}
    runs = []
    for i, run in enumerate(plan.runs):
        entry = new_entry(i, run, created)
        prev = kept.get(run.run_id)
        if prev:
            for k in ("status", "attempts", "created_at", "started_at", "finished_at", "duration_s", "outcome",
                      "error", "host", "pid"):
                if k in prev:
                    entry[k] = prev[k]
        runs.append(entry)
    history = list((old or {}).get("history", []))
    if old and old.get("definition_hash") != definition_hash(plan.run_ids):
        history.append({"at": created, "replaced_definition": old.get("definition"),
                        "replaced_run_ids": [e["run_id"] for e in old["runs"]]})
    return {
        "version": MANIFEST_VERSION, "name": plan.name, "ablation": plan.ablation, "recipe": plan.recipe,
        "definition": plan.definition, "definition_hash": definition_hash(plan.run_ids), "seeds": plan.seeds,
        "created_at": (old or {}).get("created_at", created), "updated_at": created, "argv": argv,
        "history": history, "runs": runs,
    }


def compare(plan, old: dict) -> tuple[list[str], list[str]]:
    """(added, removed) run ids of `plan` against an existing manifest."""
    before = [e["run_id"] for e in old["runs"]]
    now = plan.run_ids
    return [r for r in now if r not in set(before)], [r for r in before if r not in set(now)]


def changed_error(plan, path: Path, added: list[str], removed: list[str]) -> NobleError:
    parts = []
    if added:
        parts.append(f"{len(added)} new run(s), e.g. {added[0]}")
    if removed:
        parts.append(f"{len(removed)} run(s) no longer in it, e.g. {removed[0]}")
    return NobleError(
        f"sweep {plan.name!r} was defined differently ({'; '.join(parts)}; manifest {path}); pass --force to "
        "accept the new definition (finished runs are kept), or --name NEW to start another sweep"
    )


def sync_manifest(plan, out: Path, force: bool, argv: list[str]) -> tuple[Path, dict]:
    """Write the manifest of `plan` before anything runs: create it, keep it, or (with --force) redefine it."""
    path = manifest_path(out, plan.name)
    with file_lock(_lock_path(path)):
        old = read_manifest(path) if path.exists() else None
        if old is not None:
            if old.get("ablation") not in (None, plan.ablation) and not force:
                raise NobleError(f"sweep name {plan.name!r} is taken by a `{old.get('ablation')}` sweep ({path}); "
                                 "choose another --name")
            added, removed = compare(plan, old)
            if (added or removed) and not force:
                raise changed_error(plan, path, added, removed)
        m = build_manifest(plan, argv, old)
        atomic_write_json(path, m)
    return path, m


# --- what a run's state really is --------------------------------------------------------------------------------
def read_summary(run_dir: Path) -> dict:
    return RunFolder(Path(run_dir)).summary()


def observe(manifest: Path, entry: dict) -> tuple[str, str]:
    """(state, detail) of one run from its folder and lock: done, running, failed, interrupted or pending.

    `done` needs the run folder's summary.json to say completed (or diverged: a result, not retried).
    """
    run_dir = run_dir_of(manifest, entry)
    folder = RunFolder(run_dir)
    summary = folder.summary()
    s = summary.get("status")
    holder = RunLock(run_dir).holder()
    if holder is not None:
        return "running", f"pid {holder.get('pid')} on {holder.get('host')}"
    if s in FINISHED:
        detail = "" if entry.get("status") == "done" else "trained by another sweep or command"
        return "done", (s if s == "diverged" else detail)
    if entry.get("status") == "failed":
        return "failed", entry.get("error") or ""
    if folder.exists():
        return "interrupted", f"stopped at step {summary.get('steps', '?')}; will resume"
    return "pending", ""


def reconcile(path: Path) -> dict:
    """Bring every entry's status in line with its run folder and lock (a run killed hard stays 'running' in the
    manifest; a finished folder may come from another sweep; a deleted folder is to be trained again)."""

    def change(m: dict) -> None:
        for e in m["runs"]:
            state, detail = observe(path, e)
            if state == "done" and e["status"] != "done":
                e.update(status="done", outcome=read_summary(run_dir_of(path, e)).get("status"), error=None)
            elif state != "done" and e["status"] == "done":
                e.update(status="pending", outcome=None, error="run folder was not finished; trained again")
            elif state in ("interrupted", "pending") and e["status"] == "running":
                e.update(status="pending", error=f"interrupted ({e.get('host') or HOST} pid {e.get('pid')} is gone)")

    return update_manifest(path, change)


def counts(manifest: Path, m: dict) -> dict[str, int]:
    out = {"done": 0, "running": 0, "failed": 0, "left": 0}
    for e in m["runs"]:
        state, _ = observe(manifest, e)
        key = state if state in ("done", "running", "failed") else "left"
        out[key] += 1
    return out

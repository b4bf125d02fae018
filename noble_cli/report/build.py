"""The pure report API: results folder -> tables (no printing, no files)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from noble_cli.errors import NobleError
from noble_cli.report.figures import control_runs, pair_runs, summarize
from noble_cli.report.runs import Run, find_run_dirs, load_runs
from noble_cli.report.settings import setting_effects


@dataclass
class Report:
    results_dir: Path
    runs: list[Run]  # the paired, usable runs (with their curves, for plots)
    runs_table: pd.DataFrame  # one row per paired run (figures.RUN_COLUMNS)
    summary: pd.DataFrame  # one row per (recipe, pair_key, variant_key) (figures.SUMMARY_COLUMNS)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (run folder, reason)
    # NOBLE rows against the controls of their pair (dense-matched, init-only): one row per (recipe, pair_key,
    # control, variant), the same columns, `reference` naming the control
    controls: pd.DataFrame = field(default_factory=lambda: summarize(pd.DataFrame()))
    control_runs_table: pd.DataFrame = field(default_factory=pd.DataFrame)
    # a recipe under several settings: how each setting changes a variant's effect (settings.SETTING_COLUMNS)
    settings: pd.DataFrame = field(default_factory=lambda: setting_effects(pd.DataFrame()))


def sweep_run_dirs(results_dir: Path, sweeps: list[str]) -> set[Path]:
    """The run folders the named sweeps' manifests list (`<results>/sweeps/<name>/manifest.json`), resolved."""
    from noble_cli.sweep.manifest import manifest_path, read_manifest

    dirs: set[Path] = set()
    for name in sweeps:
        path = manifest_path(results_dir, name)
        if not path.exists():
            found = sorted(p.parent.name for p in (Path(results_dir) / "sweeps").glob("*/manifest.json"))
            valid = ", ".join(found) if found else f"none (run `noble ablate ...` with --out {results_dir} first)"
            raise NobleError(f"no sweep {name!r} under {results_dir}/sweeps; valid: {valid}")
        dirs.update((Path(results_dir) / e["run_dir"]).resolve() for e in read_manifest(path)["runs"])
    return dirs


def load_report(results_dir: Path, exclude: Path | None = None, sweeps: list[str] | None = None) -> Report:
    """Load every run folder under `results_dir` (or only those of the named `sweeps`) and compute the report's
    tables.

    Raises NobleError only when there is nothing to report on (no such folder, or no run folder in it); bad run
    folders end up in `skipped` with a reason. `exclude` is a folder not to search (the report's own output).
    """
    results_dir = Path(results_dir)
    if not results_dir.exists():
        raise NobleError(f"results folder {results_dir} does not exist; pass the folder `noble train` wrote "
                         f"runs into (default: results)")
    if not results_dir.is_dir():
        raise NobleError(f"{results_dir} is not a folder; pass a results folder holding runs/<run-id>/meta.json")
    if not find_run_dirs(results_dir, exclude=exclude):
        raise NobleError(f"no run folders under {results_dir} (none holds a meta.json); "
                         f"train some runs first with `noble train`, or pass the folder that holds them")
    only = sweep_run_dirs(results_dir, sweeps) if sweeps else None
    runs, skipped = load_runs(results_dir, exclude=exclude, only=only)
    runs_table, unpaired = pair_runs(runs)
    unpaired_paths = {p for p, _ in unpaired}
    skipped = sorted(skipped + unpaired, key=lambda t: str(t[0]))
    runs = [r for r in runs if r.path not in unpaired_paths]
    vs_controls = control_runs(runs)
    return Report(results_dir, runs, runs_table, summarize(runs_table), skipped,
                  summarize(vs_controls, by_reference=True), vs_controls, setting_effects(runs_table))


def build_report(results_dir: Path, exclude: Path | None = None, sweeps: list[str] | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, list[tuple[Path, str]]]:
    """(runs_table, summary_table, skipped) for the runs under `results_dir`; see `load_report`."""
    rep = load_report(results_dir, exclude=exclude, sweeps=sweeps)
    return rep.runs_table, rep.summary, rep.skipped

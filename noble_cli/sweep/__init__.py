"""Sweeps (`noble ablate ...`): grids of runs against their baselines, a manifest per sweep, and launchers.

- `grids`: the ablations, expanded into resolved run configs (each seed with its baseline).
- `manifest`: `<out>/sweeps/<name>/manifest.json`, written atomically, updated under a file lock.
- `locks`: the per-run lock file that keeps two processes from training one run.
- `launchers`: one entry (`execute_entry`), and the local / gpus / slurm launchers.
- `cli`: the `ablate_app` Typer app; `python -m noble_cli.sweep run-entry MANIFEST INDEX` runs one entry.
"""

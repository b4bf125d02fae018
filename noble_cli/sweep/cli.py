"""`noble ablate ...`: the sweeps. Each command expands its grid (grids.py), writes the manifest (manifest.py) and
hands it to a launcher (launchers.py). Wired into the main CLI with `app.add_typer(ablate_app, name="ablate")`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from noble_cli.config import parse_loggers
from noble_cli.console import make_console
from noble_cli.errors import NobleError, choices_error
from noble_cli.sweep import grids
from noble_cli.sweep.launchers import (
    OUTCOME_CODES,
    TrainFn,
    execute_entry,
    parse_gpus,
    run_gpus,
    run_local,
    submit_slurm,
    write_slurm_script,
)
from noble_cli.sweep.manifest import build_manifest, compare, counts, manifest_path, read_manifest, sync_manifest
from noble_cli.sweep.progress import runs_table

ablate_app = typer.Typer(
    help="Sweeps: NOBLE against its baseline (and controls) over activations, ranks, layers, optimizers and "
    "(vision) augmentations. "
    "Every seed gets its baseline; finished runs are skipped, interrupted ones resumed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
LAUNCHERS = ("local", "gpus", "slurm")

# --- options shared by the ablations ---------------------------------------------------------------------------------
LANG_RECIPE = typer.Option("llm-tiny", "--recipe", help="Recipe name or path to your YAML file.")
VISION_RECIPE = typer.Option(None, "--recipe", help="A vision recipe (task vit): name or path. Required.")
SEEDS = typer.Option("0,1,2", "--seeds", help="Seeds, comma-separated (ranges like 0-4 too). Each gets a baseline.")
MAX_STEPS = typer.Option(None, "--max-steps", help="Optimizer steps of every run (default: the recipe's).")
SETS = typer.Option([], "--set", help="Any config field for every run: --set section.key=value (repeatable).")
OUT = typer.Option(Path("results"), "--out", help="Results folder: runs in OUT/runs/, the manifest in OUT/sweeps/.")
NAME = typer.Option(None, "--name", help="Sweep name (default: <ablation>-<recipe>-<hash of the shared settings>).")
DRY_RUN = typer.Option(False, "--dry-run", help="Print the grid and what is already done; train nothing.")
FORCE = typer.Option(False, "--force", help="Accept a changed sweep definition (finished runs are kept).")
LAUNCHER = typer.Option("local", "--launcher", help="local (one run after another) | gpus (one run per GPU) | "
                        "slurm (a job array).")
GPUS = typer.Option(None, "--gpus", help="--launcher gpus: GPU indices, e.g. 0,1,2,3 (default: all visible).")
SLURM_OPT = typer.Option([], "--slurm-opt", help="--launcher slurm: an #SBATCH line, e.g. partition=gpu, "
                         "time=04:00:00, gpus-per-task=1 (repeatable).")
ISOLATE = typer.Option(True, "--isolate/--no-isolate", help="--launcher local: each run in its own process "
                       "(a crash ends one run, GPU memory starts clean) or all in this one (saves a few seconds "
                       "of start-up per run).")
WAIT = typer.Option(True, "--wait/--no-wait", help="Wait for runs another process is training (local launchers).")
LOGGER = typer.Option([], "--logger", help="Also send every run to an experiment tracker: tensorboard, wandb or "
                      "mlflow (repeatable), grouped by the sweep's name. Not part of the sweep's definition.")
BRANCH = typer.Option("cosnet", "--branch", help="The NOBLE branch activation.")
RANK = typer.Option(None, "--rank", help="Branch rank (default: the recipe's).")
DENSE_MATCH = typer.Option(False, "--dense-match", help="Add a baseline widened to the parameter count of the "
                           "main NOBLE setting, to tell a speedup from 'more parameters' (= --controls dense).")
CONTROLS = typer.Option("", "--controls", help="Controls of the main NOBLE setting, comma-separated: dense (the "
                        "baseline widened to its parameter count), init (init-only: no branch, NOBLE's main-weight "
                        "re-init on the same layers), own-init (the branch with the model's own init).")


def execute_plan(plan: grids.SweepPlan, *, out: Path, dry_run: bool = False, force: bool = False,
                 launcher: str = "local", gpus: str | None = None, slurm_opts: list[str] | None = None,
                 wait: bool = True, isolate: bool = True, train_fn: TrainFn | None = None,
                 con: Console | None = None, poll_s: float = 10.0, loggers: list[str] | tuple[str, ...] = ()
                 ) -> dict | None:
    """Dry-run, or write the manifest and run it. `train_fn` runs the entries in this process (tests).
    `loggers`: experiment trackers for every run of this launch (noble_cli/trackers.py)."""
    con = con or make_console()  # made per call: it reads the terminal's width (and $COLUMNS) now
    if launcher not in LAUNCHERS:
        raise choices_error("launcher", launcher, LAUNCHERS)
    loggers = parse_loggers(list(loggers))
    if slurm_opts and launcher != "slurm":
        raise NobleError("--slurm-opt is for --launcher slurm")
    if gpus and launcher != "gpus":
        raise NobleError("--gpus is for --launcher gpus")
    if not isolate and launcher != "local":
        raise NobleError("--no-isolate is for --launcher local")
    gpu_list = parse_gpus(gpus) if launcher == "gpus" and not dry_run else []
    for note in plan.notes:
        con.print(f"[yellow]note:[/] {escape(str(note))}")
    path = manifest_path(out, plan.name)
    if dry_run:
        show_dry_run(plan, path, con)
        return None

    path, m = sync_manifest(plan, out, force, sys.argv)
    con.print(f"sweep [bold]{escape(plan.name)}[/]: {len(m['runs'])} runs, manifest {escape(str(path))}")
    if launcher == "slurm":
        script, array = write_slurm_script(path, slurm_opts, loggers=loggers)
        con.print(f"wrote {escape(str(script))} (array {array or 'empty: every run is done'})")
        if array:
            submit_slurm(script, con)
        con.print("follow it with the same command and --dry-run; then the report: "
                  f"[bold]noble report {escape(str(out))}[/]")
        return None

    try:
        # progress on: each run shows Lightning's bar on a terminal, and a line every few seconds in a log file
        if launcher == "gpus":
            outcomes = run_gpus(path, gpu_list, con, wait=wait, loggers=loggers)
        else:
            outcomes = run_local(path, train_fn, con, progress=True, wait=wait, poll_s=poll_s,
                                 in_process=train_fn is not None or not isolate, loggers=loggers)
    except KeyboardInterrupt:
        _final(path, con)
        con.print("[yellow]interrupted[/]: run the same command again to resume (finished runs are skipped)")
        raise SystemExit(130) from None  # not typer.Exit: app(standalone_mode=False) would return it as a value
    m = _final(path, con)
    con.print(f"report: [bold]noble report {escape(str(out))}[/]")
    if outcomes.get("busy"):
        con.print(f"[yellow]{len(outcomes['busy'])} run(s) are being trained by other processes[/]; run the same "
                  "command again later to pick them up")
    failed = [e for e in m["runs"] if e["status"] == "failed"]
    if failed:
        raise NobleError(f"{len(failed)} of {len(m['runs'])} runs failed (first: {failed[0]['run_id']}: "
                         f"{failed[0].get('error')}); run the same command again to retry them")
    return outcomes


def _final(path: Path, con: Console) -> dict:
    m = read_manifest(path)
    c = counts(path, m)
    con.print(runs_table(path, m, title=f"sweep {m['name']}: {c['done']} done, {c['failed']} failed, "
                                         f"{c['running']} running, {c['left']} left", plain_title=not con.is_terminal))
    return m


def show_dry_run(plan: grids.SweepPlan, path: Path, con: Console) -> None:
    old = read_manifest(path) if path.exists() else None
    m = build_manifest(plan, [], old)
    c = counts(path, m)
    con.print(runs_table(path, m, title=f"sweep {plan.name} (dry run): {len(m['runs'])} runs, {c['done']} done, "
                                        f"{c['running']} running, {c['failed']} failed, {c['left']} to train",
                         plan=True, plain_title=not con.is_terminal))
    if old is None:
        con.print(f"no manifest yet; it would be written to {escape(str(path))}")
    else:
        added, removed = compare(plan, old)
        if added or removed:
            con.print(f"[yellow]the definition differs from {escape(str(path))}[/] "
                      f"(+{len(added)} / -{len(removed)} runs): running it needs --force")
        else:
            con.print(f"manifest {escape(str(path))}")
    con.print("nothing trained (dry run)")


def _recipe(recipe: str | None) -> str:
    return recipe or "llm-tiny"


# --- the ablations --------------------------------------------------------------------------------------------------
@ablate_app.command()
def activations(
    activations: str = typer.Option(",".join(grids.PAPER_ACTIVATIONS), "--activations",
                                    help="Branch activations, comma-separated (default: the paper's list)."),
    rank: Optional[int] = RANK,
    dense_match: bool = DENSE_MATCH, controls: str = CONTROLS,
    recipe: str = LANG_RECIPE, seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Baseline + NOBLE with each branch activation, at one rank. --controls (--dense-match) adds CosNet's controls
    at that rank."""
    plan = grids.activations_sweep(_recipe(recipe), grids.parse_activations(activations), grids.parse_seeds(seeds),
                                   rank=rank, dense_match=dense_match, max_steps=max_steps, sets=set_, name=name,
                                   controls=grids.parse_controls(controls))
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command()
def ranks(
    ranks: Optional[str] = typer.Option(None, "--ranks", help="Ranks, comma-separated (default: 16,32,64,128, "
                                        "leaving out those too large for the model)."),
    branch: str = BRANCH,
    dense_match: bool = DENSE_MATCH, controls: str = CONTROLS,
    recipe: str = LANG_RECIPE, seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Baseline + NOBLE at each rank. --controls (--dense-match) adds the branch's controls at the recipe's rank
    (or the largest swept rank when the recipe's is not swept)."""
    rank_list = grids.parse_int_list("--ranks", ranks, minimum=1, example="16,32,64,128") if ranks else None
    plan = grids.ranks_sweep(_recipe(recipe), rank_list, grids.parse_seeds(seeds), branch=grids.parse_branch(branch),
                             dense_match=dense_match, max_steps=max_steps, sets=set_, name=name,
                             controls=grids.parse_controls(controls))
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command()
def layers(
    targets: str = typer.Option(",".join(grids.LAYER_TARGETS), "--targets",
                                help="Which linears get a branch: attn, mlp, all, alternate, comma-separated (glob "
                                "pattern sets: separate the sets with ';')."),
    branch: str = BRANCH, rank: Optional[int] = RANK,
    dense_match: bool = DENSE_MATCH, controls: str = CONTROLS,
    recipe: str = LANG_RECIPE, seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Baseline + NOBLE on different sets of layers (noble.targets). --controls (--dense-match) adds the controls
    of the branch on the recipe's targets (normally all)."""
    plan = grids.layers_sweep(_recipe(recipe), grids.parse_targets(targets), grids.parse_seeds(seeds),
                              branch=grids.parse_branch(branch), rank=rank, dense_match=dense_match,
                              max_steps=max_steps, sets=set_, name=name, controls=grids.parse_controls(controls))
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command()
def mixup(
    recipe: Optional[str] = VISION_RECIPE,
    branch: str = BRANCH, rank: Optional[int] = RANK, controls: str = CONTROLS,
    seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Vision: baseline and NOBLE, each with Mixup+CutMix on and off (data.mixup, data.cutmix); --controls adds
    NOBLE's controls under each setting."""
    recipe = grids.require_vision("mixup", recipe, set_)
    plan = grids.mixup_sweep(recipe, grids.parse_seeds(seeds), branch=grids.parse_branch(branch), rank=rank,
                             max_steps=max_steps, sets=set_, name=name, controls=grids.parse_controls(controls))
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command()
def augment(
    recipe: Optional[str] = VISION_RECIPE,
    augments: str = typer.Option(",".join(grids.AUGMENTS), "--augments",
                                 help="Augmentations, each alone, comma-separated (none = all off)."),
    branch: str = BRANCH, rank: Optional[int] = RANK, controls: str = CONTROLS,
    random_erasing: float = typer.Option(0.25, "--random-erasing", help="Probability when random erasing is on."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Value when label smoothing is on."),
    drop_path: float = typer.Option(0.1, "--drop-path", help="Stochastic depth rate when it is on."),
    seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Vision: baseline and NOBLE under each augmentation alone: none, mixup, cutmix, both, randaugment,
    random_erasing, label_smoothing, stochastic_depth; --controls adds NOBLE's controls under each."""
    recipe = grids.require_vision("augment", recipe, set_)
    plan = grids.augment_sweep(recipe, grids.parse_augments(augments), grids.parse_seeds(seeds),
                               branch=grids.parse_branch(branch), rank=rank, random_erasing=random_erasing,
                               label_smoothing=label_smoothing, drop_path=drop_path, max_steps=max_steps, sets=set_,
                               name=name, controls=grids.parse_controls(controls))
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command("controls")
def controls_(
    branch: str = BRANCH, rank: Optional[int] = RANK,
    recipe: str = LANG_RECIPE, seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Is the speedup the branch's? Baseline, NOBLE (--branch at --rank, default the recipe's) and its controls:
    dense-matched (same parameter count, no branch), init-only (no branch, NOBLE's main-weight re-init on the same
    layers) and the branch with the model's own init (noble.main_init_scale=null). Any recipe, vision included."""
    plan = grids.controls_sweep(_recipe(recipe), grids.parse_seeds(seeds), branch=grids.parse_branch(branch),
                                rank=rank, max_steps=max_steps, sets=set_, name=name)
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command()
def optimizers(
    optimizers: str = typer.Option("adamw,muon", "--optimizers", help="Optimizers (optim.name), comma-separated: "
                                   "adamw, muon. Each is its own comparison: NOBLE against the baseline of its own "
                                   "optimizer."),
    branch_optimizers: str = typer.Option("adamw", "--branch-optimizers", help="Under muon, where NOBLE's branch "
                                          "matrices go (optim.branch_optimizer): adamw, muon or both, "
                                          "comma-separated (one NOBLE run each)."),
    branch: str = BRANCH, rank: Optional[int] = RANK, controls: str = CONTROLS,
    recipe: str = LANG_RECIPE, seeds: str = SEEDS, max_steps: Optional[int] = MAX_STEPS, set_: list[str] = SETS,
    out: Path = OUT, name: Optional[str] = NAME, dry_run: bool = DRY_RUN, force: bool = FORCE,
    launcher: str = LAUNCHER, gpus: Optional[str] = GPUS, slurm_opt: list[str] = SLURM_OPT, wait: bool = WAIT,
    isolate: bool = ISOLATE, logger: list[str] = LOGGER,
):
    """Does NOBLE's speedup survive a stronger optimizer? Baseline and NOBLE under each optimizer (AdamW, Muon on
    the blocks' matrices); --controls adds NOBLE's controls under each. Muon's own settings: --set optim.muon_lr=..."""
    plan = grids.optimizers_sweep(_recipe(recipe), grids.parse_optimizers(optimizers), grids.parse_seeds(seeds),
                                  branch=grids.parse_branch(branch), rank=rank,
                                  branch_optimizers=grids.parse_optimizers(branch_optimizers, "--branch-optimizers"),
                                  max_steps=max_steps, sets=set_, name=name, controls=grids.parse_controls(controls))
    execute_plan(plan, out=out, dry_run=dry_run, force=force, launcher=launcher, gpus=gpus, slurm_opts=slurm_opt,
                 wait=wait, isolate=isolate, loggers=logger)


@ablate_app.command("run-entry", hidden=True)
def run_entry(
    manifest: Path = typer.Argument(..., help="A sweep's manifest.json."),
    index: Optional[int] = typer.Argument(None, help="Entry index (default: $SLURM_ARRAY_TASK_ID)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress: Lightning's bar on a "
                                  "terminal, a line every $NOBLE_PROGRESS_SECONDS (30) seconds in a log."),
    logger: list[str] = typer.Option([], "--logger", help="Experiment trackers (replacing the config's): "
                                     "tensorboard, wandb, mlflow (repeatable)."),
):
    """(internal) Train one entry of a sweep manifest: used by the launchers and by SLURM array tasks."""
    if index is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID")
        if env is None or not env.strip().isdigit():
            raise NobleError("run-entry needs an INDEX argument or $SLURM_ARRAY_TASK_ID (an integer)")
        index = int(env)
    try:
        outcome = execute_entry(manifest, index, None, progress, make_console(stderr=True),
                                loggers=parse_loggers(logger))
    except KeyboardInterrupt:
        raise SystemExit(OUTCOME_CODES["interrupted"]) from None
    code = OUTCOME_CODES[outcome]
    if code:
        raise SystemExit(code)  # the launchers read it: 1 failed, 3 locked by another process

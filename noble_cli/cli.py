"""The `noble` command line. Each command's docstring is its --help."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.console import make_console
from noble_cli.entry import run_app
from noble_cli.errors import NobleError
from noble_cli.tasks import train_flags
from noble_cli.tasks.spec import Metric

app = typer.Typer(
    name="noble",
    help="Train, ablate and report NOBLE (nonlinear low-rank branches) against its baseline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = make_console()  # full width in a log file: lines and tables unfolded

# Options of `noble train` that map onto config fields (None = keep the recipe's value). Tasks add their own
# (`noble_cli.tasks.train_flags`, e.g. the vision augmentation switches).
TRAIN_OVERRIDES = {
    "branch": "noble.branch", "rank": "noble.rank", "targets": "noble.targets", "kernel": "noble.kernel",
    "max_steps": "trainer.max_steps", "seed": "seed", "batch_size": "trainer.batch_size", "lr": "optim.lr",
    "devices": "trainer.devices", "num_nodes": "trainer.num_nodes", "strategy": "trainer.strategy",
    "precision": "trainer.precision", "compile": "trainer.compile", "name": "name",
}


def _devices(value: Optional[str]):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def train(
    recipe: str = typer.Argument(..., help="Recipe name (see `noble recipes`) or a path to your own YAML file."),
    branch: Optional[str] = typer.Option(None, help="Branch activation (cosnet, cos, gelu_net, ...) or none."),
    rank: Optional[int] = typer.Option(None, help="Branch rank r (absolute)."),
    targets: Optional[str] = typer.Option(None, help="all | attn | mlp | alternate | glob patterns over layer names."),
    max_steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    seed: Optional[int] = typer.Option(None, help="Random seed."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size per device."),
    lr: Optional[float] = typer.Option(None, help="Base learning rate (branch multipliers apply on top)."),
    devices: Optional[str] = typer.Option(None, help="Devices per node: a number, 'auto' or a list like '0,1'."),
    num_nodes: Optional[int] = typer.Option(None, help="Nodes (Lightning launches one process per device)."),
    strategy: Optional[str] = typer.Option(None, help="auto | ddp | fsdp | any Lightning strategy."),
    precision: Optional[str] = typer.Option(None, help="auto | 32 | bf16-mixed | 16-mixed."),
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    kernel: Optional[str] = typer.Option(None, help="Branch implementation: auto | torch | triton."),
    name: Optional[str] = typer.Option(None, help="Variant label shown in reports (default: from the branch)."),
    set_: list[str] = typer.Option([], "--set", help="Any config field: --set section.key=value (repeatable)."),
    logger: list[str] = typer.Option([], "--logger", help="Also send the run to an experiment tracker: tensorboard, "
                                     "wandb or mlflow (repeatable; offline by default, see the README)."),
    out: Path = typer.Option(Path("results"), help="Results folder; the run goes to OUT/runs/<run-id>/."),
    resume: bool = typer.Option(False, "--resume", help="Continue this run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing run folder of this config first."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config, run id and parameters; train nothing."),
    **task_options,
):
    """Train one run of RECIPE and write its run folder (config, meta, metrics, summary, checkpoints)."""
    values = dict(locals())
    overrides = {TRAIN_OVERRIDES[k]: values[k] for k in TRAIN_OVERRIDES}
    overrides["trainer.devices"] = _devices(devices)
    overrides["trainer.logger"] = list(logger) or None  # none given: the recipe's (or --set's) trackers
    overrides.update(_task_overrides(recipe, set_, task_options))
    cfg = recipes.resolve(recipe, overrides, set_)
    rid = C.run_id(cfg)
    if dry_run:
        console.print(C.to_yaml(cfg))
        total, branch_params = recipes.count_recipe_params(cfg)
        console.print(f"run id: [bold]{rid}[/]  params: {total:,} (branch {branch_params:,})")
        from noble_cli.layers_cli import print_recipe_layers

        print_recipe_layers(cfg, console)
        return
    from noble_cli.train.run import check_resume_of_run_config, train as run_training

    check_resume_of_run_config(recipe, cfg, resume)
    result = run_training(cfg, out=out, resume=resume, overwrite=overwrite)
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # the other processes of a multi-device run: rank 0 reports
        return
    s = result.summary
    if result.already_done:
        console.print(f"[bold]already completed[/] {escape(str(result.run_dir))}; nothing to resume")
    metric = Metric.from_summary(s)
    console.print(
        f"[bold green]done[/] {escape(str(result.run_dir))}  best {metric.name.replace('_', ' ')} "
        f"{metric.best_in(s)} at step {s.get('best_step')}, median step "
        f"{1000 * (s.get('median_step_time_s') or 0):.1f} ms"
    )


def _task_overrides(recipe: str, sets: list[str], given: dict) -> dict:
    """Config overrides from the task options given; an option of another task is refused."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return {}
    flags, task = train_flags(), recipes.recipe_task(recipe, sets)
    for option in given:
        flag, tasks = flags[option]
        if task not in tasks:
            raise NobleError(f"--{option.replace('_', '-')} is an option of task {', '.join(tasks)}; recipe "
                             f"{recipe} has task {task}")
    return {flags[option][0].key: value for option, value in given.items()}


def _with_task_options(command):
    """`command` with the options every registered task adds, as Typer reads them from its signature."""
    hints = typing.get_type_hints(command)  # real types: this module's annotations are strings
    params = [p.replace(annotation=hints.get(p.name, p.annotation))
              for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
    for option, (flag, tasks) in train_flags().items():
        dashed = option.replace("_", "-")
        decls = [f"--{dashed}/--no-{dashed}"] if flag.kind is bool else [f"--{dashed}"]
        default = typer.Option(None, *decls, help=f"{flag.help} (task {', '.join(tasks)})")
        params.append(inspect.Parameter(option, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Optional[flag.kind]))

    def with_options(**values):
        return command(**values)

    with_options.__signature__ = inspect.Signature(params)
    with_options.__annotations__ = {p.name: p.annotation for p in params}
    with_options.__doc__ = command.__doc__
    return with_options


app.command("train")(_with_task_options(train))


@app.command("recipes")
def list_recipes():
    """List the recipes with their task, parameter count (baseline and with a CosNet branch) and data."""
    table = Table(title="recipes")
    for col in ("recipe", "task", "params", "+cosnet", "data", "steps"):
        table.add_column(col, overflow="fold")
    for row in recipes.recipe_rows():
        table.add_row(*row)
    console.print(table)


def _register_subcommands() -> None:
    """Commands that live beside their concern (data, sweeps, report, bench, layers, sample)."""
    from noble_cli.bench import bench_app
    from noble_cli.data.cli import data_app
    from noble_cli.layers_cli import layers
    from noble_cli.report.cli import report
    from noble_cli.sample import sample
    from noble_cli.sweep.cli import ablate_app

    app.add_typer(data_app, name="data")
    app.add_typer(ablate_app, name="ablate")
    app.add_typer(bench_app, name="bench")
    app.command()(report)
    app.command()(layers)
    app.command()(sample)


_register_subcommands()


def main() -> None:
    """Entry point: user errors become one line on stderr and a non-zero exit, never a traceback."""
    run_app(app)

"""`noble bench step`: a whole training step (forward, backward, grad clip, AdamW) of a recipe's model, baseline vs
NOBLE per implementation, on random batches (no data needed)."""

from __future__ import annotations

import datetime as _dt
import re
import statistics
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer
from lightning.fabric.utilities.apply_func import move_data_to_device
from rich.console import Console
from rich.table import Table

from noble_cli.bench.common import (
    FUSED_VARIANTS, VARIANTS, RowsFile, autocast, csv_items, default_out, device_name, device_of, error_text, fmt,
    fresh_compile, interpret_note, kernel_options, peak_mb, prec_label, precision_of, reset_memory, sync, time_ms,
    triton_skip_reason, use_fused,
)
from noble_cli.config import NobleConfig, optimizer_label, validated
from noble_cli.errors import NobleError
from noble_cli.layers.activations import resolve_activation
from noble_cli.layers.implementation import has_fused_kernel
from noble_cli.recipes import resolve
from noble_cli.train.run_folder import library_versions

console = Console()
def _peak_flops(dev: torch.device, precision: str) -> float | None:
    if dev.type != "cuda" or precision != "bf16-mixed":
        return None
    from noble_cli.train.recorder import peak_flops

    return peak_flops()


def step_config(recipe: str, branch: str, overrides: dict, sets: list[str], wanted: list[str]):
    """The recipe's config and the checked branch, before anything is timed (a late refusal would throw the
    finished rows away)."""
    base_cfg = resolve(recipe, overrides, sets)
    if branch.strip().lower() == "none":
        raise NobleError("--branch none would time the baseline against itself; give a branch such as cosnet")
    branch = resolve_activation(branch)
    fused_wanted = [v for v in wanted if v in FUSED_VARIANTS]
    if fused_wanted and not has_fused_kernel(branch):
        raise NobleError(f"variants {', '.join(fused_wanted)} need --branch cosnet (the fused kernels' only "
                         f"branch), not {branch}; for other branches use --variants baseline,noble-torch")
    return base_cfg, branch


def step_rows(base_cfg, branch: str, wanted: list[str], modes: list[str], dev: torch.device, prec: str, warmup: int,
              iters: int) -> Iterator[dict]:
    """The table's rows, each yielded as soon as it is measured."""
    from noble_cli.layers import noble_layers
    from noble_cli.tasks import get_task

    skip_triton = triton_skip_reason(dev)
    flops_base: dict[str, float] = {}
    for mode in modes:
        base_ms = None
        for variant in wanted:
            row = {"variant": variant, "mode": mode, "device": dev.type, "ms": None, "overhead": None, "mfu": None,
                   "flops_per_step": None, "flop_overhead": None, "params": None, "peak_mem_mb": None,
                   "skipped": None}
            if variant in FUSED_VARIANTS and skip_triton:
                row["skipped"] = skip_triton
                yield row
                continue
            noble = validated(NobleConfig, {**base_cfg.noble.model_dump(), "kernel": "torch", "dense_match": False,
                                            "branch": "none" if variant == "baseline" else branch}, "noble.")
            cfg = base_cfg.model_copy(update={"noble": noble})
            torch.manual_seed(cfg.seed)
            module = opt = batch = None
            try:
                with kernel_options(**FUSED_VARIANTS.get(variant, {})):
                    module = get_task(cfg.task).build_module(cfg).to(dev)
                    module.configure_model()
                    if variant in FUSED_VARIANTS:
                        use_fused([m for _, m in noble_layers(module.model)])
                    # the model's own optimizer (a GAN's discriminator, which has its own, is not timed)
                    opt, _ = module.optimizer_and_schedule()
                    if mode == "compiled":
                        module.model = fresh_compile(module.model)
                    gen = torch.Generator().manual_seed(cfg.seed)
                    batch, items = get_task(cfg.task).synthetic_batch(module, cfg.trainer.batch_size, gen)
                    batch = move_data_to_device(batch, dev)
                    params = [p for g in opt.param_groups for p in g["params"]]
                    clip = cfg.optim.grad_clip

                    def train_step():
                        opt.zero_grad(set_to_none=True)
                        with autocast(dev, prec):
                            loss, _ = module.loss(batch)
                        loss.backward()
                        if clip:
                            torch.nn.utils.clip_grad_norm_(params, clip)
                        opt.step()

                    train_step()  # compilation / autotuning
                    sync(dev)
                    reset_memory(dev)
                    times = time_ms(train_step, dev, warmup, iters)
                row["ms"] = statistics.median(times)
                row["peak_mem_mb"] = peak_mb(dev)
                row["params"] = module.params.total
                per_item = module.flops_per_item()
                if per_item:
                    row["flops_per_step"] = per_item * items
                    peak = _peak_flops(dev, prec)
                    if peak:
                        row["mfu"] = row["flops_per_step"] / (row["ms"] / 1000) / peak
            except NobleError:
                raise
            except Exception as e:  # one broken variant must not hide the others' numbers
                row["skipped"] = f"error: {error_text(e)}"
            finally:
                module = opt = batch = None
                reset_memory(dev)
            if variant == "baseline":
                base_ms = row["ms"]
                if row["flops_per_step"]:
                    flops_base[mode] = row["flops_per_step"]
            else:
                if base_ms and row["ms"] is not None:
                    row["overhead"] = row["ms"] / base_ms - 1
                if flops_base.get(mode) and row["flops_per_step"]:
                    row["flop_overhead"] = row["flops_per_step"] / flops_base[mode] - 1
            yield row


def step_header(base_cfg, branch: str, dev: torch.device, prec: str, warmup: int, iters: int) -> dict:
    t = base_cfg.trainer
    return {
        "kind": "step", "recipe": base_cfg.recipe, "task": base_cfg.task, "device": device_name(dev),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "versions": library_versions(), "precision": prec,
        "batch_size": t.batch_size, "seq_len": getattr(base_cfg.data, "seq_len", None), "model": base_cfg.model.model_dump(),
        "branch": branch, "rank": base_cfg.noble.rank, "targets": base_cfg.noble.targets,
        "activation_checkpointing": t.activation_checkpointing, "warmup": warmup, "iters": iters,
        "optimizer": (optimizer_label(base_cfg) or "adamw") + (" (fused AdamW)" if dev.type == "cuda" else ""),
    }


def step(
    recipe: str = typer.Option(..., "--recipe", help="Recipe name (see `noble recipes`) or a YAML path."),
    branch: str = typer.Option("cosnet", help="Branch of the NOBLE variants (the Triton ones need cosnet)."),
    rank: Optional[int] = typer.Option(None, help="Branch rank (default: the recipe's noble.rank)."),
    targets: Optional[str] = typer.Option(None, help="Augmented layers (default: the recipe's noble.targets)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default: the recipe's)."),
    seq_len: Optional[int] = typer.Option(None, help="Sequence length for LM tasks (default: the recipe's)."),
    variants: str = typer.Option("baseline,noble-torch,noble-triton",
                                 help=f"Comma-separated subset of {', '.join(VARIANTS)}."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="Also time torch.compile'd models."),
    precision: str = typer.Option("auto", help="auto (bf16-mixed on GPU, 32 on CPU) | 32 | bf16-mixed."),
    warmup: int = typer.Option(5, min=0, help="Untimed steps before timing (after the first, compiling one)."),
    iters: int = typer.Option(20, min=1, help="Timed steps (the median is reported)."),
    device: str = typer.Option("auto", help="auto | cuda | cpu."),
    set_: list[str] = typer.Option([], "--set", help="Any config field: --set section.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, help="JSON output, rewritten after every row (default: "
                                                  "results/bench/step-<recipe>-<device>-<date>.json)."),
):
    """A whole training step (forward, backward, grad clip, AdamW) of RECIPE's model: baseline vs NOBLE."""
    dev = device_of(device)
    prec = precision_of(precision, dev)
    wanted = csv_items(variants, "variants", VARIANTS)
    modes = ["eager", "compiled"] if compile else ["eager"]
    overrides = {"noble.rank": rank, "noble.targets": targets, "trainer.batch_size": batch_size,
                 "data.seq_len": seq_len}
    base_cfg, branch = step_config(recipe, branch, overrides, set_, wanted)
    path = out or default_out("step", dev, f"-{re.sub(r'[^A-Za-z0-9_.-]+', '-', base_cfg.recipe)}")
    doc = RowsFile(path, step_header(base_cfg, branch, dev, prec, warmup, iters))
    for row in step_rows(base_cfg, branch, wanted, modes, dev, prec, warmup, iters):
        doc.add(row)
    doc.write(complete=True)
    print_step_table(doc.rows, base_cfg, branch, dev, prec)
    note = interpret_note(doc.rows)
    if note:
        console.print(f"[yellow]{note}[/]")
    console.print(f"wrote {path}")


def print_step_table(rows: list[dict], base_cfg, branch: str, dev: torch.device, prec: str) -> None:
    table = Table(title=f"noble bench step — {base_cfg.recipe}, {device_name(dev)}, batch "
                        f"{base_cfg.trainer.batch_size}, {prec_label(prec)}, {branch} r{base_cfg.noble.rank}")
    for col in ("variant", "mode", "ms/step", "overhead", "FLOP overhead", "MFU", "params", "peak MB", "note"):
        table.add_column(col, justify="left" if col in ("variant", "mode", "note") else "right", overflow="fold")
    for r in rows:
        table.add_row(r["variant"], r["mode"], fmt(r["ms"], ".2f"), fmt(r["overhead"], "+.1%"),
                      fmt(r["flop_overhead"], "+.1%"), fmt(r["mfu"], ".1%"),
                      fmt(r["params"] and r["params"] / 1e6, ".1f") + ("M" if r["params"] else ""),
                      fmt(r["peak_mem_mb"], ".0f"), r["skipped"] or "")
    console.print(table)

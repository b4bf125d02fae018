"""`noble bench layer`: one augmented linear, forward + backward, baseline nn.Linear vs NOBLE CosNet per
implementation."""

from __future__ import annotations

import datetime as _dt
import re
import statistics
from pathlib import Path
from typing import Iterator, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from noble_cli.bench.common import (
    FUSED_VARIANTS, VARIANTS, RowsFile, autocast, csv_items, csv_ints, default_out, device_name, device_of,
    error_text, fmt, fresh_compile, interpret_note, kernel_options, peak_mb, prec_label, precision_of, reset_memory,
    sync, time_ms, triton_skip_reason, use_fused,
)
from noble_cli.errors import NobleError
from noble_cli.train.run_folder import library_versions

console = Console()


def branch_flops_ratio(n_in: int, n_out: int, rank: int) -> float:
    """FLOPs of the branch's matrix products over the main GEMM's (forward and backward scale alike):
    (r*in + r*r + r*out) / (in*out). The elementwise cos/sin work is O(r) per token and left out."""
    return (rank * n_in + rank * rank + rank * n_out) / (n_in * n_out)


def parse_shapes(shapes: Optional[str], dims: int) -> list[tuple[str, int, int]]:
    """`name:INxOUT,...` or, by default, the GPT shapes of width `dims`: qkvo d->d, fc d->4d, fc2 4d->d."""
    if not shapes:
        return [("qkvo", dims, dims), ("fc", dims, 4 * dims), ("fc2", 4 * dims, dims)]
    out = []
    for i, item in enumerate(csv_items(shapes, "shapes")):
        name, _, spec = item.rpartition(":")
        m = re.fullmatch(r"(\d+)x(\d+)", spec)
        if not m:
            raise NobleError(f"malformed shape {item!r}; expected [name:]INxOUT, e.g. fc:1024x4096")
        out.append((name or f"s{i}", int(m.group(1)), int(m.group(2))))
    return out


def _layer_module(variant: str, n_in: int, n_out: int, rank: int, dev: torch.device) -> nn.Module:
    from noble_cli.layers import NobleLinear

    if variant == "baseline":
        return nn.Linear(n_in, n_out, bias=False, device=dev)
    layer = NobleLinear(n_in, n_out, bias=False, rank=rank, activation="cosnet", kernel="torch", device=dev)
    if variant in FUSED_VARIANTS:
        use_fused([layer])
    return layer


def _bench_layer(mod: nn.Module, x: torch.Tensor, dev: torch.device, precision: str, warmup: int, iters: int):
    params = [p for p in mod.parameters()]
    grad_out = {}

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        with autocast(dev, precision):
            y = mod(x)
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(y)
        y.backward(grad_out["g"])

    fwd_bwd()  # first call: compilation / autotuning, outside the memory peak and the timings
    sync(dev)
    reset_memory(dev)
    times = time_ms(fwd_bwd, dev, warmup, iters)
    return statistics.median(times), peak_mb(dev)


def layer_rows(shape_list, rank_list, wanted, modes, tokens: int, dev: torch.device, prec: str, warmup: int,
               iters: int, seed: int) -> Iterator[dict]:
    """The table's rows, each yielded as soon as it is measured (the baseline first in every shape and mode: the
    others' overhead is against it)."""
    skip_triton = triton_skip_reason(dev)
    for name, n_in, n_out in shape_list:
        for mode in modes:
            base_ms = None
            # the baseline does not depend on the rank: timed once per shape and mode
            combos = [("baseline", None)] if "baseline" in wanted else []
            combos += [(v, r) for r in rank_list for v in wanted if v != "baseline"]
            for variant, rank in combos:
                row = {"shape": name, "in": n_in, "out": n_out, "rank": rank, "variant": variant, "mode": mode,
                       "tokens": tokens, "device": dev.type, "ms": None, "overhead": None, "peak_mem_mb": None,
                       "flop_ratio": None if rank is None else branch_flops_ratio(n_in, n_out, rank),
                       "skipped": None}
                if rank is not None and not 1 <= rank < min(n_in, n_out):
                    row["skipped"] = f"rank {rank} >= min(in, out)"
                    yield row
                    continue
                if variant in FUSED_VARIANTS and skip_triton:
                    row["skipped"] = skip_triton
                    yield row
                    continue
                torch.manual_seed(seed)
                mod = x = None
                try:
                    with kernel_options(**FUSED_VARIANTS.get(variant, {})):
                        mod = _layer_module(variant, n_in, n_out, rank or 1, dev)
                        if mode == "compiled":
                            mod = fresh_compile(mod)
                        x = torch.randn(tokens, n_in, device=dev, requires_grad=True)
                        row["ms"], row["peak_mem_mb"] = _bench_layer(mod, x, dev, prec, warmup, iters)
                except NobleError:
                    raise
                except Exception as e:  # one broken variant must not hide the others' numbers
                    row["skipped"] = f"error: {error_text(e)}"
                finally:
                    mod = x = None
                    reset_memory(dev)
                if variant == "baseline":
                    base_ms = row["ms"]
                elif base_ms and row["ms"] is not None:
                    row["overhead"] = row["ms"] / base_ms - 1
                yield row


def print_layer_table(rows: list[dict], dev: torch.device, tokens: int, prec: str) -> None:
    table = Table(title=f"noble bench layer — {device_name(dev)}, {tokens} tokens, {prec_label(prec)}, "
                        "forward + backward")
    for col in ("shape", "rank", "variant", "mode", "ms", "overhead", "floor (FLOPs)", "peak MB", "note"):
        table.add_column(col, justify="right" if col in ("rank", "ms", "overhead", "floor (FLOPs)", "peak MB")
                         else "left", overflow="fold")
    for r in rows:
        table.add_row(f"{r['shape']} {r['in']}->{r['out']}", fmt(r["rank"], "d"), r["variant"], r["mode"],
                      fmt(r["ms"], ".3f"), fmt(r["overhead"], "+.1%"), fmt(r["flop_ratio"], "+.1%"),
                      fmt(r["peak_mem_mb"], ".0f"), r["skipped"] or "")
    console.print(table)


def layer(
    tokens: int = typer.Option(16 * 1024, help="Tokens per call (the llm-250m step: 16 x 1024)."),
    dims: int = typer.Option(1024, help="Model width d: shapes qkvo d->d, fc d->4d, fc2 4d->d."),
    shapes: Optional[str] = typer.Option(None, help="Explicit shapes instead: name:INxOUT,... (e.g. fc:1024x4096)."),
    ranks: str = typer.Option("32,64", help="Branch ranks, comma-separated."),
    variants: str = typer.Option(",".join(VARIANTS), help=f"Comma-separated subset of {', '.join(VARIANTS)}."),
    compile: bool = typer.Option(False, "--compile/--no-compile", help="Also time torch.compile'd modules."),
    precision: str = typer.Option("auto", help="auto (bf16-mixed on GPU, 32 on CPU) | 32 | bf16-mixed."),
    warmup: int = typer.Option(10, min=0, help="Untimed iterations before timing."),
    iters: int = typer.Option(50, min=1, help="Timed iterations (the median is reported)."),
    device: str = typer.Option("auto", help="auto | cuda | cpu."),
    seed: int = typer.Option(0, help="Random seed for weights and inputs."),
    out: Optional[Path] = typer.Option(None, help="JSON output, rewritten after every row (default "
                                                  "results/bench/layer-<device>-<date>.json)."),
):
    """One augmented linear, forward + backward: baseline nn.Linear vs NOBLE CosNet per implementation."""
    dev = device_of(device)
    prec = precision_of(precision, dev)
    wanted = csv_items(variants, "variants", VARIANTS)
    rank_list = csv_ints(ranks, "ranks")
    shape_list = parse_shapes(shapes, dims)
    modes = ["eager", "compiled"] if compile else ["eager"]
    path = out or default_out("layer", dev)
    doc = RowsFile(path, {"kind": "layer", "device": device_name(dev),
                          "date": _dt.datetime.now().isoformat(timespec="seconds"), "versions": library_versions(),
                          "precision": prec, "tokens": tokens, "warmup": warmup, "iters": iters})
    for row in layer_rows(shape_list, rank_list, wanted, modes, tokens, dev, prec, warmup, iters, seed):
        doc.add(row)
    doc.write(complete=True)
    print_layer_table(doc.rows, dev, tokens, prec)
    note = interpret_note(doc.rows)
    if note:
        console.print(f"[yellow]{note}[/]")
    console.print(f"wrote {path}")

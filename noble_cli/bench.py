"""`noble bench`: how much a NOBLE branch costs, per layer and per training step, for each implementation.

    noble bench layer                       one augmented linear at the llm-250m shapes, forward + backward
    noble bench step --recipe llm-250m      a whole training step (forward, backward, clip, AdamW) of a recipe

Variants: `baseline` (plain nn.Linear / the recipe without branches), `noble-torch` (NobleLinear's torch path),
`noble-triton` (the fused kernels of noble_kernels), `noble-triton-cublas` (fused r-wide kernels, cuBLAS for the
full-width GEMMs). Times are medians over timed iterations after warm-up (CUDA events on a GPU, wall clock on a
CPU). On a CPU the Triton variants run only under TRITON_INTERPRET=1, where their times mean nothing: the CPU mode
exists to check that the command works end to end. Nothing here asserts speed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import re
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import nn

from noble_cli.atomic import atomic_write_json
from noble_cli.errors import NobleError
from noble_cli.layers.activations import resolve_activation
from noble_cli.train.run_folder import library_versions

bench_app = typer.Typer(
    help="Time NOBLE against its baseline: one layer (`layer`) or a whole training step (`step`).",
    no_args_is_help=True,
)
console = Console()

VARIANTS = ("baseline", "noble-torch", "noble-triton", "noble-triton-cublas")
TRITON_VARIANTS = {"noble-triton": "triton", "noble-triton-cublas": "torch"}  # variant -> noble_kernels gemm


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers

def import_noble_kernels():
    """`noble_kernels` as installed (`pip install -e .` maps kernels/ to it), else straight from the source tree."""
    try:
        import noble_kernels
    except ImportError:
        import importlib.util

        root = Path(__file__).resolve().parent.parent / "kernels"
        if not (root / "__init__.py").exists():
            raise
        spec = importlib.util.spec_from_file_location("noble_kernels", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        noble_kernels = importlib.util.module_from_spec(spec)
        sys.modules["noble_kernels"] = noble_kernels
        spec.loader.exec_module(noble_kernels)
    return noble_kernels


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NobleError("--device cuda: no CUDA GPU is visible")
    return dev


def _device_slug(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def _precision(name: str, dev: torch.device) -> str:
    if name == "auto":
        return "bf16-mixed" if dev.type == "cuda" else "32"
    if name not in ("32", "bf16-mixed"):
        raise NobleError(f"unknown precision {name!r}; valid: auto, 32, bf16-mixed")
    return name


def _prec_label(precision: str) -> str:
    return "fp32" if precision == "32" else "bf16 autocast"


def _autocast(dev: torch.device, precision: str):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def _csv(value: str, what: str, valid: tuple[str, ...] | None = None) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise NobleError(f"--{what} is empty")
    if valid:
        for v in items:
            if v not in valid:
                noun = what[:-1] if what.endswith("s") else what
                raise NobleError(f"unknown {noun} {v!r}; valid: {', '.join(valid)}")
    return items


def _ints(value: str, what: str) -> list[int]:
    try:
        return [int(v) for v in _csv(value, what)]
    except ValueError:
        raise NobleError(f"--{what} must be comma-separated integers, got {value!r}") from None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], None], dev: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-iteration times in ms: CUDA events around each call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def _reset_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def triton_skip_reason(dev: torch.device) -> str | None:
    """Why the fused variants cannot run here, or None if they can."""
    try:
        nk = import_noble_kernels()
    except ImportError as e:
        return f"noble_kernels not importable ({e})"
    if nk.available(dev):
        return None
    if dev.type == "cpu":
        return "CPU without TRITON_INTERPRET=1"
    return "triton not installed"


def _default_out(kind: str, dev: torch.device, extra: str = "") -> Path:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return Path("results") / "bench" / f"{kind}{extra}-{_device_slug(dev)}-{stamp}.json"


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _interpret_note(rows: list[dict]) -> str | None:
    if any(r["variant"] in TRITON_VARIANTS and r.get("ms") is not None and r["device"] == "cpu" for r in rows):
        return "Triton variants ran in Triton's CPU interpreter (TRITON_INTERPRET=1): their times are meaningless."
    return None


def _fused_forward(gemm: str):
    """A NobleLinear forward that always calls the fused op with the given GEMM backend (NobleLinear's own dispatch
    uses the default backend)."""
    nk = import_noble_kernels()

    def forward(self, x):
        a = self.act
        return nk.cosnet_linear(x, self.weight, self.bias, self.down.weight, self.down.bias, a.freq1, a.phase1,
                                a.mix.weight, a.mix.bias, a.freq2, a.phase2, self.up.weight, gemm=gemm)

    return forward


def _use_fused(layers, variant: str, dev: torch.device) -> None:
    """Point NobleLinear `layers` at the fused kernels for a Triton variant.

    On CUDA `noble-triton` is NobleLinear's own dispatch (kernel="triton"), i.e. exactly what training runs; the
    other cases (the cuBLAS-GEMM variant, the CPU interpreter) bind the fused forward explicitly."""
    for layer in layers:
        if layer.activation != "cosnet":
            raise NobleError(f"the fused kernels implement the cosnet branch only, not {layer.activation}")
        layer.kernel = "triton"
        if variant != "noble-triton" or dev.type != "cuda":
            layer.forward = types.MethodType(_fused_forward(TRITON_VARIANTS[variant]), layer)


def _fresh_compile(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with a clean dynamo cache and static shapes, for every compiled row.

    All NobleLinear instances share one forward: across many rows (shapes x ranks x kernels) dynamo would hit its
    recompile limit and silently run later rows eager, and after the first shape change it would mark inputs
    dynamic, so rows would be timed with different kinds of graphs."""
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


# ---------------------------------------------------------------------------------------------------------------
# noble bench layer

def branch_flops_ratio(n_in: int, n_out: int, rank: int) -> float:
    """FLOPs of the branch's matrix products over the main GEMM's (forward and backward scale alike):
    (r*in + r*r + r*out) / (in*out). The elementwise cos/sin work is O(r) per token and left out."""
    return (rank * n_in + rank * rank + rank * n_out) / (n_in * n_out)


def _parse_shapes(shapes: Optional[str], dims: int) -> list[tuple[str, int, int]]:
    """`name:INxOUT,...` or, by default, the GPT shapes of width `dims`: qkvo d->d, fc d->4d, fc2 4d->d."""
    if not shapes:
        return [("qkvo", dims, dims), ("fc", dims, 4 * dims), ("fc2", 4 * dims, dims)]
    out = []
    for i, item in enumerate(_csv(shapes, "shapes")):
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
    if variant in TRITON_VARIANTS:
        _use_fused([layer], variant, dev)
    return layer


def _bench_layer(mod: nn.Module, x: torch.Tensor, dev: torch.device, precision: str, warmup: int, iters: int):
    params = [p for p in mod.parameters()]
    grad_out = {}

    def fwd_bwd():
        for p in params:
            p.grad = None
        x.grad = None
        with _autocast(dev, precision):
            y = mod(x)
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(y)
        y.backward(grad_out["g"])

    fwd_bwd()  # first call: compilation / autotuning, outside the memory peak and the timings
    _sync(dev)
    _reset_memory(dev)
    times = time_ms(fwd_bwd, dev, warmup, iters)
    return statistics.median(times), _peak_mb(dev)


@bench_app.command()
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
    out: Optional[Path] = typer.Option(None, help="JSON output (default results/bench/layer-<device>-<date>.json)."),
):
    """One augmented linear, forward + backward: baseline nn.Linear vs NOBLE CosNet per implementation."""
    dev = _device(device)
    prec = _precision(precision, dev)
    wanted = _csv(variants, "variants", VARIANTS)
    rank_list = _ints(ranks, "ranks")
    shape_list = _parse_shapes(shapes, dims)
    modes = ["eager", "compiled"] if compile else ["eager"]
    skip_triton = triton_skip_reason(dev)
    rows: list[dict] = []

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
                rows.append(row)
                if rank is not None and not 1 <= rank < min(n_in, n_out):
                    row["skipped"] = f"rank {rank} >= min(in, out)"
                    continue
                if variant in TRITON_VARIANTS and skip_triton:
                    row["skipped"] = skip_triton
                    continue
                torch.manual_seed(seed)
                try:
                    mod = _layer_module(variant, n_in, n_out, rank or 1, dev)
                    if mode == "compiled":
                        mod = _fresh_compile(mod)
                    x = torch.randn(tokens, n_in, device=dev, requires_grad=True)
                    row["ms"], row["peak_mem_mb"] = _bench_layer(mod, x, dev, prec, warmup, iters)
                except NobleError:
                    raise
                except Exception as e:  # one broken variant must not hide the others' numbers
                    row["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                finally:
                    mod = x = None
                    _reset_memory(dev)
                if variant == "baseline":
                    base_ms = row["ms"]
                elif base_ms and row["ms"] is not None:
                    row["overhead"] = row["ms"] / base_ms - 1

    payload = {
        "kind": "layer", "device": _device_name(dev), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "versions": library_versions(), "precision": prec, "tokens": tokens, "warmup": warmup, "iters": iters,
        "note": _interpret_note(rows), "rows": rows,
    }
    path = out or _default_out("layer", dev)
    atomic_write_json(path, payload)

    table = Table(title=f"noble bench layer — {_device_name(dev)}, {tokens} tokens, {_prec_label(prec)}, "
                        "forward + backward")
    for col in ("shape", "rank", "variant", "mode", "ms", "overhead", "floor (FLOPs)", "peak MB", "note"):
        table.add_column(col, justify="right" if col in ("rank", "ms", "overhead", "floor (FLOPs)", "peak MB")
                         else "left", overflow="fold")
    for r in rows:
        table.add_row(f"{r['shape']} {r['in']}->{r['out']}", _fmt(r["rank"], "d"), r["variant"], r["mode"],
                      _fmt(r["ms"], ".3f"), _fmt(r["overhead"], "+.1%"), _fmt(r["flop_ratio"], "+.1%"),
                      _fmt(r["peak_mem_mb"], ".0f"), r["skipped"] or "")
    console.print(table)
    if payload["note"]:
        console.print(f"[yellow]{payload['note']}[/]")
    console.print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------------
# noble bench step

STEP_TASKS = ("causal_lm", "image_lm", "vit")


def _synthetic_batch(task: str, module, batch_size: int, dev: torch.device, gen: torch.Generator):
    """A batch of the task's shape (random tokens / images): a step's cost does not depend on the data."""
    m = module.model_cfg
    if task in ("causal_lm", "image_lm"):
        seq = module.seq_len
        x = torch.randint(0, m.vocab_size, (batch_size, seq + 1), generator=gen).to(dev)
        return (x[:, :-1].contiguous(), x[:, 1:].contiguous()), batch_size * seq
    if task == "vit":
        images = torch.randn(batch_size, m.in_channels, m.image_size, m.image_size, generator=gen).to(dev)
        labels = torch.randint(0, m.num_classes, (batch_size,), generator=gen).to(dev)
        return (images, labels), batch_size
    raise NobleError(f"noble bench step supports tasks {', '.join(STEP_TASKS)}; recipe task is {task!r}")


def _peak_flops(dev: torch.device, precision: str) -> float | None:
    if dev.type != "cuda" or precision != "bf16-mixed":
        return None
    try:
        from noble_cli.train.recorder import peak_flops

        return peak_flops()
    except ImportError:
        return None


@bench_app.command()
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
    out: Optional[Path] = typer.Option(None, help="JSON output (default: results/bench/step-<recipe>-<device>-<date>"
                                                  ".json)."),
):
    """A whole training step (forward, backward, grad clip, AdamW) of RECIPE's model: baseline vs NOBLE."""
    from noble_cli import config as C
    from noble_cli.tasks import get_task

    dev = _device(device)
    prec = _precision(precision, dev)
    wanted = _csv(variants, "variants", VARIANTS)
    modes = ["eager", "compiled"] if compile else ["eager"]
    skip_triton = triton_skip_reason(dev)
    overrides = {"noble.rank": rank, "noble.targets": targets, "trainer.batch_size": batch_size,
                 "data.seq_len": seq_len}
    base_cfg = C.resolve(recipe, overrides, set_)
    if base_cfg.task not in STEP_TASKS:
        raise NobleError(f"noble bench step supports tasks {', '.join(STEP_TASKS)}; {recipe} is {base_cfg.task}")
    # the branch is checked before anything is timed: a late refusal would throw the finished rows away
    if branch.strip().lower() == "none":
        raise NobleError("--branch none would time the baseline against itself; give a branch such as cosnet")
    branch = resolve_activation(branch)
    fused_wanted = [v for v in wanted if v in TRITON_VARIANTS]
    if fused_wanted and branch != "cosnet":
        raise NobleError(f"variants {', '.join(fused_wanted)} need --branch cosnet (the fused kernels' only "
                         f"branch), not {branch}; for other branches use --variants baseline,noble-torch")
    rows: list[dict] = []
    flops_base: dict[str, float] = {}

    for mode in modes:
        base_ms = None
        for variant in wanted:
            row = {"variant": variant, "mode": mode, "device": dev.type, "ms": None, "overhead": None, "mfu": None,
                   "flops_per_step": None, "flop_overhead": None, "params": None, "peak_mem_mb": None,
                   "skipped": None}
            rows.append(row)
            if variant in TRITON_VARIANTS and skip_triton:
                row["skipped"] = skip_triton
                continue
            noble = dataclasses.replace(base_cfg.noble, branch="none" if variant == "baseline" else branch,
                                        kernel="torch", dense_match=False)
            cfg = dataclasses.replace(base_cfg, noble=noble)
            C.validate(cfg)
            torch.manual_seed(cfg.seed)
            module = opt = batch = None
            try:
                module = get_task(cfg.task).load().build_module(cfg).to(dev)
                if hasattr(module, "configure_model"):
                    module.configure_model()
                if variant in TRITON_VARIANTS:
                    from noble_cli.layers import noble_layers

                    _use_fused([m for _, m in noble_layers(module.model)], variant, dev)
                opt = module.configure_optimizers()["optimizer"]
                if mode == "compiled":
                    module.model = _fresh_compile(module.model)
                gen = torch.Generator().manual_seed(cfg.seed)
                batch, items = _synthetic_batch(cfg.task, module, cfg.trainer.batch_size, dev, gen)
                params = [p for g in opt.param_groups for p in g["params"]]
                clip = cfg.optim.grad_clip

                def train_step():
                    opt.zero_grad(set_to_none=True)
                    with _autocast(dev, prec):
                        loss, _ = module.loss(batch)
                    loss.backward()
                    if clip:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    opt.step()

                train_step()  # compilation / autotuning
                _sync(dev)
                _reset_memory(dev)
                times = time_ms(train_step, dev, warmup, iters)
                row["ms"] = statistics.median(times)
                row["peak_mem_mb"] = _peak_mb(dev)
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
                row["skipped"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            finally:
                module = opt = batch = None
                _reset_memory(dev)
            if variant == "baseline":
                base_ms = row["ms"]
                if row["flops_per_step"]:
                    flops_base[mode] = row["flops_per_step"]
            else:
                if base_ms and row["ms"] is not None:
                    row["overhead"] = row["ms"] / base_ms - 1
                if flops_base.get(mode) and row["flops_per_step"]:
                    row["flop_overhead"] = row["flops_per_step"] / flops_base[mode] - 1

    t = base_cfg.trainer
    payload = {
        "kind": "step", "recipe": base_cfg.recipe, "task": base_cfg.task, "device": _device_name(dev),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "versions": library_versions(), "precision": prec,
        "batch_size": t.batch_size, "seq_len": base_cfg.data.get("seq_len"), "model": base_cfg.model,
        "branch": branch, "rank": base_cfg.noble.rank, "targets": base_cfg.noble.targets, "warmup": warmup,
        "iters": iters, "optimizer": "AdamW" + (" (fused)" if dev.type == "cuda" else ""),
        "note": _interpret_note(rows), "rows": rows,
    }
    path = out or _default_out("step", dev, f"-{re.sub(r'[^A-Za-z0-9_.-]+', '-', base_cfg.recipe)}")
    atomic_write_json(path, payload)

    table = Table(title=f"noble bench step — {base_cfg.recipe}, {_device_name(dev)}, batch {t.batch_size}, "
                        f"{_prec_label(prec)}, "
                        f"{branch} r{base_cfg.noble.rank}")
    for col in ("variant", "mode", "ms/step", "overhead", "FLOP overhead", "MFU", "params", "peak MB", "note"):
        table.add_column(col, justify="left" if col in ("variant", "mode", "note") else "right", overflow="fold")
    for r in rows:
        table.add_row(r["variant"], r["mode"], _fmt(r["ms"], ".2f"), _fmt(r["overhead"], "+.1%"),
                      _fmt(r["flop_overhead"], "+.1%"), _fmt(r["mfu"], ".1%"),
                      _fmt(r["params"] and r["params"] / 1e6, ".1f") + ("M" if r["params"] else ""),
                      _fmt(r["peak_mem_mb"], ".0f"), r["skipped"] or "")
    console.print(table)
    if payload["note"]:
        console.print(f"[yellow]{payload['note']}[/]")
    console.print(f"wrote {path}")


__all__ = ["bench_app", "branch_flops_ratio", "import_noble_kernels", "time_ms"]

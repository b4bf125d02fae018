"""`noble layers MODEL_OR_RECIPE`: which layers get a NOBLE branch, their shapes, and what the branches cost.

Everything is built on the meta device (shapes, no memory, no weights), so a 1.5B recipe or a 7B config.json costs
nothing. FLOPs are counted by torch's FlopCounterMode over one forward pass on a meta input (token ids 1 x T, or one
image): matmul FLOPs, attention included, elementwise work (the cosines) not — the floor a fused kernel can reach.
The same ratio holds for training (forward + backward is ~3x forward for both the model and its branches).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from noble_cli.errors import NobleError
from noble_cli.layers import NobleLinear, apply_noble, count_parameters, set_kernel
from noble_cli.layers.targets import ALREADY_BRANCHED, LinearSite, linear_sites, parse_targets

SOURCES = ("a recipe name (see `noble recipes`)", "a recipe .yaml path", "a transformers config.json path",
           "hf:MODEL_TYPE (e.g. hf:llama, tiny sizes)", "timm:NAME (e.g. timm:vit_small_patch16_224)")


@dataclass
class LayerCost:
    site: LinearSite
    branch_params: int
    main_params: int
    branch_flops: int | None  # per forward of the example input; None where not counted
    main_flops: int | None


@dataclass
class LayerReport:
    title: str
    branch: str
    rank: int
    targets: str
    layers: list[LayerCost]
    skipped: list[LinearSite]  # picked by the targets, but cannot carry a branch
    params_total: int
    params_branch: int
    flops_total: int | None  # with branches
    flops_input: str  # what the counted forward ran on, or why nothing was counted


# --- building the model -------------------------------------------------------------------------------------------


def _recipe_model(spec: str, branch: str, rank: int | None, targets: str | None):
    """(model with branches, example input, config) of a recipe, built as `noble train` builds it."""
    from noble_cli.recipes import resolve
    from noble_cli.tasks import get_task

    overrides = {"noble.branch": branch, "noble.rank": rank, "noble.targets": targets}
    cfg = resolve(spec, overrides)
    with torch.device("meta"):
        model = get_task(cfg.task).build_module(cfg).model
        example = _recipe_input(cfg)
    return model, example, cfg


def _recipe_input(cfg) -> torch.Tensor:
    """One image for models with an image size, else token ids of the data's sequence length (or the context)."""
    m, d = cfg.model, cfg.data
    size = getattr(m, "image_size", None)
    if size:
        return torch.zeros(1, getattr(m, "in_channels", 3), size, size)
    return torch.zeros(1, getattr(d, "seq_len", None) or getattr(m, "block_size", None) or 128, dtype=torch.long)


def _external_model(spec: str):
    from noble_cli.models import external

    with torch.device("meta"):
        if spec.startswith("timm:"):
            model = external.timm_model(spec[5:])
        else:
            model = external.hf_model(external.hf_config(spec))
        return model, external.example_input(model)


def _is_external(spec: str) -> bool:
    return spec.startswith(("hf:", "timm:")) or spec.endswith(".json")


def build(spec: str, branch: str = "cosnet", rank: int | None = None, targets: str | None = None):
    """(model with branches on the meta device, example input, resolved branch, rank, targets)."""
    from noble_cli.layers import resolve_activation
    from noble_cli.recipes import list_recipes

    if branch == "none":
        raise NobleError("--branch none adds no layer; give a branch such as cosnet")
    branch = resolve_activation(branch)
    if _is_external(spec):
        rank, targets = 32 if rank is None else rank, targets or "all"
        parse_targets(targets)
        model, example = _external_model(spec)
        with warnings.catch_warnings():  # layers that keep no branch are listed under the table instead
            warnings.simplefilter("ignore")
            apply_noble(model, rank=rank, activation=branch, targets=targets)
        return model, example, branch, rank, targets
    if not spec.endswith((".yaml", ".yml")) and spec not in list_recipes():
        raise NobleError(f"unknown model or recipe {spec!r}; valid: {', '.join(SOURCES)}")
    model, example, cfg = _recipe_model(spec, branch, rank, targets)
    return model, example, branch, cfg.noble.rank, cfg.noble.targets


# --- counting -----------------------------------------------------------------------------------------------------


CPU_FALLBACK_PARAMS = 100_000_000  # a model the meta device cannot run is counted on the CPU up to this size


def _flop_counts(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int] | None, str]:
    """Matmul FLOPs per module (qualified name -> FLOPs, '' = the whole model) of one forward on `example`.

    On the meta device; a model whose forward needs values (the VQGAN's code histogram) runs once more on the CPU
    with uninitialized weights when it is small: FLOPs depend on shapes only."""
    shape = "x".join(str(n) for n in example.shape)
    what = "tokens" if example.dtype == torch.long else "image"
    try:
        counter = _count(model, example, "meta")
    except Exception as e:  # noqa: BLE001  (any failure of a foreign model's forward on meta tensors)
        if sum(p.numel() for p in model.parameters()) > CPU_FALLBACK_PARAMS:
            return None, f"FLOPs not counted: a forward on the meta device failed ({type(e).__name__})"
        try:
            counter = _count(model.to_empty(device="cpu"), example, "cpu")
        except Exception as e:  # noqa: BLE001
            return None, f"FLOPs not counted: a forward on meta tensors and on the CPU failed ({type(e).__name__})"
    root = type(model).__name__
    counts = {k.removeprefix(root + "."): sum(v.values())
              for k, v in counter.get_flop_counts().items() if k.startswith(root + ".")}
    counts[""] = counter.get_total_flops()
    return counts, f"one forward over a {shape} {what} input"


def _count(model: nn.Module, example: torch.Tensor, device: str):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device(device), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros_like(example, device=device))
    return counter


def _cost(site: LinearSite, counts: dict[str, int] | None) -> LayerCost:
    layer = site.module
    branch_parts = (layer.down, layer.act, layer.up)
    branch_params = sum(p.numel() for part in branch_parts for p in part.parameters())
    main_params = layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    if counts is None:
        return LayerCost(site, branch_params, main_params, None, None)
    branch = sum(counts.get(f"{site.name}.{part}", 0) for part in ("down", "act", "up"))
    return LayerCost(site, branch_params, main_params, branch, counts.get(site.name, 0) - branch)


def report(spec: str, branch: str = "cosnet", rank: int | None = None, targets: str | None = None) -> LayerReport:
    model, example, branch, rank, targets = build(spec, branch, rank, targets)
    return report_of(model, example, spec, branch, rank, targets)


def report_of(model: nn.Module, example: torch.Tensor, title: str, branch: str, rank: int,
              targets: str) -> LayerReport:
    set_kernel(model, "torch")  # the fused kernel is one op the counter cannot split into main and branch
    match = parse_targets(targets)
    sites = linear_sites(model)
    counts, flops_input = _flop_counts(model, example)
    layers = [_cost(s, counts) for s in sites if isinstance(s.module, NobleLinear)]
    skipped = [s for s in sites if s.skip and s.skip != ALREADY_BRANCHED and match(s)]
    params = count_parameters(model)
    return LayerReport(title, branch, rank, targets, layers, skipped, params.total, params.branch,
                       counts[""] if counts else None, flops_input)


# --- rendering ----------------------------------------------------------------------------------------------------


def _split(site: LinearSite) -> tuple[str, str, str]:
    """(name before the block's index, the index, name after it); outside the blocks the whole name is the head."""
    if site.block is None:
        return site.name, "", ""
    head, _, index = site.block.rpartition(".")
    return (head + "." if head else ""), index, site.name[len(site.block):]


def _indices(parts: list[str]) -> str:
    """Block indices as `{0..11}`, `{0,2,..,10}` or `{1,4,7}`; `*` for names that are not numbers."""
    if len(parts) == 1:
        return parts[0]
    if not all(p.isdigit() for p in parts):
        return "*"
    n = [int(p) for p in parts]
    steps = {b - a for a, b in zip(n, n[1:])}
    if steps == {1}:
        return f"{{{n[0]}..{n[-1]}}}"
    if len(steps) == 1 and len(n) > 3:
        return f"{{{n[0]},{n[1]},..,{n[-1]}}}"
    return "{" + ",".join(parts) + "}"


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(part: float | None, whole: float | None) -> str:
    return "-" if part is None or not whole else f"+{100 * part / whole:.2f}%"


def _rows(rep: LayerReport, expand: bool) -> list[tuple[str, LayerCost, int]]:
    """(name, a representative layer, how many) in model order. Unless `expand`, the same layer of repeated blocks
    with the same shape is one row, its block indices written as a range: `blocks.{0..11}.attn.q`."""
    groups: dict[tuple, list[LayerCost]] = {}
    for c in rep.layers:
        s = c.site
        head, _, tail = _split(s)
        key = (s.name,) if expand else (head, tail, s.role, s.in_features, s.out_features, c.branch_params)
        groups.setdefault(key, []).append(c)
    rows = []
    for group in groups.values():
        head, _, tail = _split(group[0].site)
        name = group[0].site.name if len(group) == 1 else head + _indices([_split(c.site)[1] for c in group]) + tail
        rows.append((name, group[0], len(group)))
    return rows


def render(rep: LayerReport, console: Console, expand: bool = False) -> None:
    """The table, a total line and a line per targeted layer that cannot carry a branch. Plain text throughout: a
    name such as `hf:llama` is neither markup nor an emoji code."""
    table = Table(title=Text(f"NOBLE branches in {rep.title}: {rep.branch}, rank {rep.rank}, targets {rep.targets}"))
    for col in ("layer", "role", "in -> out", "count", "+params each", "+params", "+FLOPs"):
        table.add_column(col, justify="left" if col in ("layer", "role") else "right", no_wrap=True)
    rows = _rows(rep, expand)
    for name, c, n in rows:
        s = c.site
        table.add_row(Text(name), s.role or "-", f"{s.in_features} -> {s.out_features}", str(n),
                      f"{c.branch_params:,}", _pct(c.branch_params, c.main_params), _pct(c.branch_flops, c.main_flops))
    widest = max((len(name) for name, _, _ in rows), default=0)
    wide = Console(file=console.file, width=max(console.width, widest + 80))  # whole names, also in a pipe
    wide.print(table)
    wide.print(Text(summary(rep)), soft_wrap=True)
    for s in rep.skipped:
        wide.print(Text(f"not augmented: {s.name} ({s.skip})"), soft_wrap=True)


def summary(rep: LayerReport) -> str:
    base = rep.params_total - rep.params_branch
    line = (f"{len(rep.layers)} layers get a branch: +{rep.params_branch:,} parameters "
            f"({_pct(rep.params_branch, base)} of {base:,})")
    if rep.flops_total is None:
        return f"{line}; {rep.flops_input}"
    branch = sum(c.branch_flops for c in rep.layers)
    return (f"{line}; +{_human(branch)} matmul FLOPs ({_pct(branch, rep.flops_total - branch)} of "
            f"{_human(rep.flops_total - branch)}, {rep.flops_input})")


# --- the commands -------------------------------------------------------------------------------------------------


def layers(
    model_or_recipe: str = typer.Argument(..., help="A recipe name or .yaml path, a transformers config.json, "
                                          "hf:MODEL_TYPE (tiny sizes, e.g. hf:llama) or timm:NAME."),
    branch: str = typer.Option("cosnet", help="Branch activation (cosnet, cos, gelu_net, ...)."),
    rank: Optional[int] = typer.Option(None, help="Branch rank (default: the recipe's, else 32)."),
    targets: Optional[str] = typer.Option(None, help="all | attn | mlp | alternate | glob patterns "
                                          "(default: the recipe's, else all)."),
    expand: bool = typer.Option(False, "--expand", help="One row per layer instead of one per repeated layer."),
):
    """List the layers that get a NOBLE branch, their shapes, and the parameter and FLOP overhead."""
    render(report(model_or_recipe, branch, rank, targets), Console(), expand)


def print_recipe_layers(cfg, console: Console) -> None:
    """The `noble layers` table of a resolved config, for `noble train --dry-run`."""
    if not cfg.noble.enabled:
        console.print("baseline: no layer gets a branch")
        return
    from noble_cli.tasks import get_task

    with torch.device("meta"):
        model = get_task(cfg.task).build_module(cfg).model
        example = _recipe_input(cfg)
    render(report_of(model, example, cfg.recipe or "config", cfg.noble.branch, cfg.noble.rank, cfg.noble.targets),
           console)

"""Put NOBLE branches into any model, count what they cost, and build the optimizer groups they need."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from noble_cli.errors import NobleError
from noble_cli.layers.linear import NobleLinear
from noble_cli.layers.targets import TARGET_SETS, LinearSite, linear_sites, parse_targets, select  # noqa: F401

# TARGET_SETS is re-exported (noble_cli.layers, config validation); the targeting rule lives in layers/targets.py.


def target_matcher(targets: str):
    """Validate a targets spec (`all`, `attn`, `mlp`, `alternate` or glob patterns); returns LinearSite -> bool.

    Kept for the config and sweep validation that call it; the rule itself is in `noble_cli.layers.targets`."""
    return parse_targets(targets)


def _probe_matches_linear(site: LinearSite) -> bool:
    """Whether the layer computes x W^T + b (x W + b for Conv1D) on a small random input; meta tensors pass (no
    values to compare), integer (quantized) weights fail."""
    m = site.module
    w = m.weight
    if w.is_meta:
        return True
    if not w.is_floating_point():
        return False
    with torch.no_grad():
        x = torch.randn(2, site.in_features, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        weight = w if site.kind == "linear" else w.t()
        tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
        return torch.allclose(m(x), F.linear(x, weight, m.bias), rtol=tol, atol=tol)


def _check_forward(site: LinearSite, checked: dict[type, bool]) -> None:
    """nn.Linear's own forward, or Conv1D's, is known; a subclass that overrides it is checked once per class."""
    cls = type(site.module)
    if cls is nn.Linear or (site.kind == "linear" and cls.forward is nn.Linear.forward):
        return
    if cls not in checked:
        checked[cls] = _probe_matches_linear(site)
    if not checked[cls]:
        raise NobleError(f"{site.name} is a {cls.__name__} whose forward is not a plain linear map (x W^T + b): "
                         "a NobleLinear in its place would change the model; choose targets without it")


def _as_noble(site: LinearSite, rank: int, activation: str, up_init_scale: float, kernel: str) -> NobleLinear:
    """A NobleLinear computing what `site` computes: weight (out, in) copied exactly, Conv1D's transposed."""
    old = site.module
    if not 1 <= rank < min(site.in_features, site.out_features):
        raise NobleError(
            f"rank {rank} is invalid for {site.name} ({site.in_features}->{site.out_features}): "
            f"it must be >= 1 and < min(in, out) = {min(site.in_features, site.out_features)}"
        )
    new = NobleLinear(
        site.in_features, site.out_features, bias=old.bias is not None, rank=rank, activation=activation,
        up_init_scale=up_init_scale, kernel=kernel, device=old.weight.device, dtype=old.weight.dtype,
    )
    # The same Parameter objects, not copies: values, requires_grad and any tie to another module stay as they were.
    if site.kind == "linear":
        new.weight = old.weight
    else:  # Conv1D keeps (in, out): the nn.Linear layout is its transpose
        with torch.no_grad():
            new.weight.copy_(old.weight.t())
        new.weight.requires_grad_(old.weight.requires_grad)
    if old.bias is not None:
        new.bias = old.bias  # (out,) in both layouts
    new.train(old.training)
    return new


def _replace(model: nn.Module, swaps: dict[int, nn.Module]) -> None:
    """Put each new module wherever its old one sits (a module shared by two parents is swapped in both)."""
    for parent in model.modules():
        for attr, child in list(parent.named_children()):
            if id(child) in swaps:
                setattr(parent, attr, swaps[id(child)])


def apply_noble(
    model: nn.Module,
    rank: int = 32,
    activation: str = "cosnet",
    targets: str = "all",
    *,
    up_init_scale: float = 0.01,
    kernel: str = "torch",
    reinit_main: float | None = None,
) -> list[str]:
    """Replace the targeted linear layers of `model` in place by NobleLinear, keeping their weights exactly.

    Which layers `targets` picks is the rule in `noble_cli.layers.targets` (transformer blocks found from the
    model's structure; their attention and MLP projections; never embeddings or heads). nn.Linear subclasses and
    GPT-2's Conv1D become NobleLinear: at init the model computes the same function, apart from the branch's
    near-zero output (and the main re-init, if asked). A Conv1D's state-dict layout changes: its `weight` becomes
    (out, in), the nn.Linear layout, and `down.*`, `act.*`, `up.*` entries appear; load pretrained Conv1D weights
    before calling this. nn.Linear weights and all biases stay the very same Parameter objects. Layers whose weight the
    model reads without calling them (nn.MultiheadAttention's `out_proj`) are left alone, with a warning.

    `reinit_main`, if given, re-initializes the main weights with N(0, (reinit_main/sqrt(in))^2) — the paper uses 0.5
    when training from scratch. Returns the qualified names of the replaced layers.
    """
    chosen, skipped = select(model, targets)
    if not chosen:
        raise NobleError(_nothing_matched(model, targets, skipped))
    if skipped:
        warnings.warn(f"apply_noble: {len(skipped)} targeted layers keep no branch, e.g. {skipped[0].name} "
                      f"({skipped[0].skip})", stacklevel=2)
    checked: dict[type, bool] = {}
    swaps = {}
    for site in chosen:
        _check_forward(site, checked)
        new = _as_noble(site, rank, activation, up_init_scale, kernel)
        if reinit_main is not None:
            new.reset_main(reinit_main)
        swaps[id(site.module)] = new
    _replace(model, swaps)
    return [site.name for site in chosen]


def _nothing_matched(model: nn.Module, targets: str, skipped: list[LinearSite]) -> str:
    if skipped:
        return (f"targets {targets!r} matched no linear layer that can carry a branch: {skipped[0].name} "
                f"({skipped[0].skip})")
    names = [s.name for s in linear_sites(model) if not s.skip]
    shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
    return f"targets {targets!r} matched no linear layer; the model's linear layers are: {shown}"


def reinit_main_weights(model: nn.Module, targets: str = "all", scale: float = 0.5) -> list[str]:
    """The init-only control: re-initialize the main weights of the linears `apply_noble` would augment (same
    `targets`, same selection) as it does, N(0, (scale/sqrt(in))^2) with bias 0, and add no branch.

    The formula is NobleLinear.reset_main's own (called on the plain nn.Linear: it reads only `weight`, `bias` and
    `in_features`), so the control and a NOBLE run can never drift apart in how they re-initialize.
    Returns the qualified names of the re-initialized layers.
    """
    chosen, skipped = select(model, targets)
    if not chosen:
        raise NobleError(_nothing_matched(model, targets, skipped))
    for site in chosen:
        if site.kind == "linear":
            NobleLinear.reset_main(site.module, scale)
        else:  # GPT-2's Conv1D: the same i.i.d. normal in its (in, out) layout, fan-in = its nx
            with torch.no_grad():
                site.module.weight.normal_(0.0, scale / site.in_features**0.5)
                site.module.bias.zero_()
    return [site.name for site in chosen]


def noble_layers(model: nn.Module) -> list[tuple[str, NobleLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, NobleLinear)]


def set_kernel(model: nn.Module, kernel: str) -> None:
    for _, layer in noble_layers(model):
        layer.kernel = kernel


@dataclass(frozen=True)
class ParamCount:
    total: int
    branch: int

    @property
    def base(self) -> int:
        return self.total - self.branch

    @property
    def overhead(self) -> float:
        """branch / params of the same model without branches."""
        return self.branch / self.base if self.base else 0.0


def _branch_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for _, layer in noble_layers(model):
        for part in (layer.down, layer.act, layer.up):
            ids.update(id(p) for p in part.parameters())
    return ids


def count_parameters(model: nn.Module) -> ParamCount:
    """Unique parameters (tied weights counted once), and how many of them belong to NOBLE branches."""
    params = {id(p): p for p in model.parameters()}
    branch = _branch_param_ids(model)
    return ParamCount(
        total=sum(p.numel() for p in params.values()),
        branch=sum(params[i].numel() for i in branch if i in params),
    )


def muon_parameters(model: nn.Module, branch_matrices: bool = False) -> list[tuple[nn.Parameter, bool]]:
    """What Muon optimizes: the 2-D main weights of the linear layers inside the transformer blocks (those `all`
    means, by the rule in targets.py: attention and MLP projections, augmented or not), and with `branch_matrices`
    the 2-D parameters of the NOBLE branches too (W_down, W_up, an r x r mix). Never embeddings, heads or anything
    outside the blocks, nor vectors (biases, norms, cosine frequencies and phases). Each parameter once, in model
    order; frozen ones left out. Each comes with whether it is stored (in, out), as a GPT-2 Conv1D's weight is:
    Muon's shape adjustment reads a weight as (out, in), so the optimizer corrects the learning rate of those."""
    sites = [s for s in linear_sites(model) if s.role is not None]
    main = {id(s.module.weight) for s in sites}
    transposed = {id(s.module.weight) for s in sites if s.kind == "conv1d"}
    branch = _branch_param_ids(model) if branch_matrices else set()
    out, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and p.ndim == 2 and id(p) not in seen and (id(p) in main or id(p) in branch):
            seen.add(id(p))
            out.append((p, id(p) in transposed))
    return out


@dataclass(frozen=True)
class LRMultipliers:
    """The paper's per-parameter learning-rate multipliers (lr = base_lr * mult)."""

    up_power: float = 0.4  # W_up: (min(in,out)/r)^0.4
    mix_power: float = 0.5  # CosNet's r x r `mix`: (min(in,out)/r)^0.5; 0 reproduces the reference code's 1
    freq: float = 2.0
    phase: float = 4.0


def lr_multiplier(layer: NobleLinear, local_name: str, mults: LRMultipliers) -> float:
    """Multiplier for the parameter `local_name` (e.g. 'up.weight', 'act.freq1') of a NobleLinear: W_up's, or the
    role its activation declares for it in `lr_roles` (activations.py)."""
    ratio = min(layer.in_features, layer.out_features) / layer.rank
    if local_name == "up.weight":
        return ratio**mults.up_power
    role = getattr(layer.act, "lr_roles", {}).get(local_name.removeprefix("act."))
    return {"mix": ratio**mults.mix_power, "freq": mults.freq, "phase": mults.phase}.get(role, 1.0)


def param_groups(
    model: nn.Module, base_lr: float, weight_decay: float, mults: LRMultipliers = LRMultipliers(),
    no_decay=(),
) -> list[dict]:
    """AdamW parameter groups: NOBLE's lr multipliers, weight decay on matrices only (not biases, norms, freqs) and
    not on the tensors in `no_decay` (position embeddings, class tokens: the timm/DeiT convention).

    Each group carries `lr_mult` so that a schedule can scale every group's lr by the same factor.
    """
    mult_of: dict[int, float] = {}
    for lname, layer in noble_layers(model):
        for pname, p in layer.named_parameters():
            if pname.split(".")[0] in ("down", "act", "up"):
                mult_of[id(p)] = lr_multiplier(layer, pname, mults)
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {}
    skip_decay = {id(p) for p in no_decay}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = (mult_of.get(id(p), 1.0), p.ndim >= 2 and id(p) not in skip_decay)
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "lr": base_lr * mult, "lr_mult": mult, "weight_decay": weight_decay if decay else 0.0}
        for (mult, decay), ps in sorted(groups.items())
    ]

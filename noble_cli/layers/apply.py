"""Put NOBLE branches into any model, count what they cost, and build the optimizer groups they need."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import nn

from noble_cli.errors import NobleError
from noble_cli.layers.linear import NobleLinear

# Named target sets. Anything else is read as comma-separated glob patterns over qualified module names.
TARGET_SETS = ("all", "attn", "mlp", "alternate")
_ATTN = re.compile(r"(attn|attention)", re.I)
_MLP = re.compile(r"(mlp|ffn|feed_?forward|intermediate)", re.I)
_BLOCK_INDEX = re.compile(r"\.(\d+)(\.|$)")


def _is_attn(name: str) -> bool:
    return any(_ATTN.search(part) for part in name.split(".")[:-1])


def _is_mlp(name: str) -> bool:
    return any(_MLP.search(part) for part in name.split(".")[:-1])


def _block_index(name: str) -> int | None:
    m = _BLOCK_INDEX.search("." + name)
    return int(m.group(1)) if m else None


def target_matcher(targets: str):
    """Return name -> bool for a targets spec: `all`, `attn`, `mlp`, `alternate` or glob patterns `a.*,b.*`."""
    spec = targets.strip()
    if spec == "attn":
        return _is_attn
    if spec == "mlp":
        return _is_mlp
    if spec == "all":
        return lambda n: _is_attn(n) or _is_mlp(n)
    if spec == "alternate":  # every other block (0, 2, 4, ...), attention and MLP
        return lambda n: (_is_attn(n) or _is_mlp(n)) and (_block_index(n) or 0) % 2 == 0
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns or not any(ch in spec for ch in "*?[.") and spec not in TARGET_SETS:
        raise NobleError(
            f"unknown target {targets!r}; valid: {', '.join(TARGET_SETS)}, or glob patterns over module names "
            "such as 'blocks.*.attn.*,blocks.*.mlp.fc1'"
        )
    return lambda n: any(fnmatchcase(n, p) for p in patterns)


def _replaceable_linears(model: nn.Module):
    """(qualified name, parent, attribute, linear) for every nn.Linear whose forward is actually called.

    nn.MultiheadAttention reads its `out_proj.weight` directly instead of calling the module, so a branch there would
    silently do nothing: those are left out.
    """
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue
        for attr, child in parent.named_children():
            if type(child) is nn.Linear:
                name = f"{parent_name}.{attr}" if parent_name else attr
                yield name, parent, attr, child


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
    """Replace the targeted nn.Linear layers of `model` in place by NobleLinear, keeping their weights.

    `reinit_main`, if given, re-initializes the main weights with N(0, (reinit_main/sqrt(in))^2) — the paper uses 0.5
    when training from scratch. Returns the qualified names of the replaced layers.
    """
    match = target_matcher(targets)
    chosen = [item for item in _replaceable_linears(model) if match(item[0])]
    if not chosen:
        names = [n for n, *_ in _replaceable_linears(model)]
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise NobleError(f"targets {targets!r} matched no linear layer; the model's linear layers are: {shown}")
    for name, parent, attr, old in chosen:
        new = NobleLinear(
            old.in_features, old.out_features, bias=old.bias is not None, rank=rank, activation=activation,
            up_init_scale=up_init_scale, kernel=kernel, device=old.weight.device, dtype=old.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        if reinit_main is not None:
            new.reset_main(reinit_main)
        setattr(parent, attr, new)
    return [name for name, *_ in chosen]


def reinit_main_weights(model: nn.Module, targets: str = "all", scale: float = 0.5) -> list[str]:
    """The init-only control: re-initialize the main weights of the linears `apply_noble` would augment (same
    `targets`, same selection) as it does, N(0, (scale/sqrt(in))^2) with bias 0, and add no branch.

    The formula is NobleLinear.reset_main's own (called on the plain nn.Linear: it reads only `weight`, `bias` and
    `in_features`), so the control and a NOBLE run can never drift apart in how they re-initialize.
    Returns the qualified names of the re-initialized layers.
    """
    match = target_matcher(targets)
    chosen = [(name, layer) for name, _, _, layer in _replaceable_linears(model) if match(name)]
    if not chosen:
        names = [n for n, *_ in _replaceable_linears(model)]
        shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        raise NobleError(f"targets {targets!r} matched no linear layer; the model's linear layers are: {shown}")
    for _, layer in chosen:
        NobleLinear.reset_main(layer, scale)
    return [name for name, _ in chosen]


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

"""Which linear layers of a model get a NOBLE branch: found from the model's structure, not from a list of names.

The rule, for any model (ours, Hugging Face transformers, timm, torchvision):

1. **Linear layers.** An `nn.Linear` or any subclass (Falcon's `FalconLinear`, torch's
   `NonDynamicallyQuantizableLinear`), and GPT-2-style `Conv1D` (a linear whose weight is stored transposed,
   `(in, out)`; recognised by its class name, its `nf`/`nx` attributes and that weight shape, so transformers need
   not be imported). A subclass whose forward is not `x W^T + b` (a quantized or adapter layer) is refused when the
   branch is put in (`apply.py` checks it on a probe input).
2. **Transformer blocks.** A block list is a `ModuleList` or `Sequential` whose members that hold linear layers are
   all of one class and each hold at least two linear layers of their own (not counting those inside block lists
   nested in them); its members are the blocks. The search goes top-down and stops at the first block list on each
   path, so a mixture-of-experts list inside a decoder layer belongs to that layer, while a Swin stage (a member of
   a list of stages holding only a downsampling linear of its own) is looked into and its own list of blocks is
   found. Embeddings, patch embeddings, poolers, LM and classifier heads live outside the blocks: never targeted.
3. **Attention or MLP.** Inside a block, a linear layer belongs to attention when a module between the block and
   it is an attention module: `nn.MultiheadAttention`, or a class named `*Attention*`/`*Attn*` (what every family
   here calls it: `LlamaAttention`, `GPT2Attention`, `BertAttention`, timm's `Attention`, `WindowAttention`, ...).
   Where no class says so, attribute names on the path break the tie (`attn`, `self_attention`, a linear named
   `attn` sitting directly on the block); where neither does, the
   position: the block's first part (its first child subtree, in registration order) holding two or more linear
   layers is attention, as every transformer block runs attention before its feed-forward. **Every other linear
   layer in a block is MLP**: gated `gate/up/down`, BERT's `intermediate.dense` and `output.dense`, Falcon's and
   NeoX's `dense_h_to_4h/dense_4h_to_h`, whatever the family names them.
4. **Weights read directly.** A linear layer whose weight some module's forward passes on (`self.out_proj.weight`
   in `nn.MultiheadAttention`, `self.qkv.weight` in torchvision's Swin attention, the eval fast path of
   `nn.TransformerEncoderLayer`) would carry a branch that never runs: it is skipped, with the reason, found by
   reading the forward's source (`self.<path>.weight` not followed by `.dtype`/`.shape`/..., and no call
   `self.<path>(...)` in the same forward).
5. **Target sets.** `all` = attention + MLP layers of every block; `attn`, `mlp` their parts; `alternate` = both
   in every other block (index 0, 2, 4, ... within its block list, so an encoder and a decoder each start at 0);
   anything else is comma-separated glob patterns over qualified layer names, matched against every linear layer
   of the model (heads included: the user named them). A model with no block list (a toy) falls back to name
   hints on the path: `attn`/`attention` for attention, `mlp`/`ffn`/`feed_forward`/`intermediate` for MLP.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

from torch import nn

from noble_cli.errors import NobleError
from noble_cli.layers.linear import NobleLinear
from noble_cli.parsing import split_list

TARGET_SETS = ("all", "attn", "mlp", "alternate")
_CONTAINERS = (nn.ModuleList, nn.Sequential)
_ATTN_HINT = re.compile(r"attn|attention", re.I)
_MLP_HINT = re.compile(r"mlp|ffn|feed_?forward|intermediate", re.I)  # the no-block fallback only
ALREADY_BRANCHED = "already has a NOBLE branch"
_BLOCK_INDEX = re.compile(r"\.(\d+)(\.|$)")
# `self.<path>.weight` used as a value; reading only its metadata (dtype, device, shape) does not bypass the module.
_WEIGHT_READ = re.compile(
    r"self\.([\w.]+?)\.weight\b(?!\s*\.\s*(?:dtype|device|shape|size|ndim|numel|requires_grad|is_\w+)\b)"
)


@dataclass(frozen=True)
class LinearSite:
    """One linear layer of a model and what the rule says about it."""

    name: str  # qualified module name
    module: nn.Module
    kind: str  # "linear" (nn.Linear or a subclass) | "conv1d" (GPT-2's Conv1D, weight stored (in, out))
    in_features: int
    out_features: int
    block: str | None  # the transformer block holding it; None outside every block
    block_index: int | None  # that block's position in its block list
    role: str | None  # "attn" | "mlp" | None (outside the blocks)
    skip: str | None  # why it cannot carry a branch, or None


def linear_kind(m: nn.Module) -> str | None:
    """"linear", "conv1d" (GPT-2's transposed-weight Conv1D) or None for anything else."""
    if isinstance(m, nn.Linear):
        return "linear"
    w = getattr(m, "weight", None)
    if (type(m).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.ndim == 2
            and tuple(w.shape) == (getattr(m, "nx", None), getattr(m, "nf", None))):
        return "conv1d"
    return None


def _features(m: nn.Module, kind: str) -> tuple[int, int]:
    return (m.in_features, m.out_features) if kind == "linear" else (m.nx, m.nf)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def walk(module: nn.Module, prefix: str = ""):
    """(qualified name, module) like `named_modules`, without looking inside linear layers: a NobleLinear's
    `down`/`up`/`act.mix` are parts of one layer, never projections of the model."""
    yield prefix, module
    if linear_kind(module):
        return
    for name, child in module.named_children():
        yield from walk(child, _join(prefix, name))


def _count_linears(m: nn.Module) -> int:
    return sum(1 for _, x in walk(m) if linear_kind(x))


# --- 2. blocks ----------------------------------------------------------------------------------------------------


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(qualified name, block, index in its block list) of every transformer block, in model order."""
    return _scan(model, "")


def _scan(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module, int]]:
    if linear_kind(module):  # a NobleLinear's parts are not blocks
        return []
    if isinstance(module, _CONTAINERS):
        members = _block_members(module)
        if members is not None:
            return [(_join(prefix, n), m, i) for i, (n, m) in enumerate(members)]
    found = []
    for name, child in module.named_children():
        found += _scan(child, _join(prefix, name))
    return found


def _block_members(container: nn.Module) -> list[tuple[str, nn.Module]] | None:
    members = [(n, m) for n, m in container.named_children() if _count_linears(m)]
    if not members or len({type(m) for _, m in members}) != 1:
        return None
    if any(_own_linears(m) < 2 for _, m in members):
        return None
    return members


def _own_linears(block: nn.Module) -> int:
    """Linear layers of `block` outside the block lists nested in it (experts, a Swin stage's blocks)."""
    nested = [b for name, child in block.named_children() for _, b, _ in _scan(child, name)]
    return _count_linears(block) - sum(_count_linears(b) for b in nested)


# --- 3. attention or MLP ------------------------------------------------------------------------------------------


def _is_attention_class(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or bool(_ATTN_HINT.search(type(m).__name__))


def _block_roles(block: nn.Module) -> dict[str, str]:
    """Relative name -> "attn" | "mlp" for every linear layer of one block (rule 3)."""
    paths = {}  # relative linear name -> the modules on the way to it (block excluded, linear excluded)
    for rel, m in walk(block):
        if rel and linear_kind(m):
            parts = rel.split(".")
            paths[rel] = [(p, block.get_submodule(".".join(parts[: i + 1]))) for i, p in enumerate(parts[:-1])]
    by_class = {r for r, chain in paths.items() if any(_is_attention_class(m) for _, m in chain)}
    attn = by_class or {r for r in paths if any(_ATTN_HINT.search(p) for p in r.split("."))}
    if not attn:
        attn = _first_multi_linear_part(block, paths)
    return {r: "attn" if r in attn else "mlp" for r in paths}


def _first_multi_linear_part(block: nn.Module, paths: dict[str, list]) -> set[str]:
    for name, child in block.named_children():
        inside = {r for r in paths if r == name or r.startswith(name + ".")}
        if len(inside) >= 2:
            return inside
    return set()


# --- 4. weights read directly -------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _weight_reads(cls: type) -> tuple[str, ...]:
    """Relative paths whose `.weight` the class's forward uses directly and whose module it never calls (its
    source, read once per class). A forward that also calls the module (T5's dtype check, BLOOM's optional
    tensor-parallel slicing) runs the branch on its usual path."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):  # built in, or defined where the source is gone: assume it calls its modules
        return ()
    read = set(_WEIGHT_READ.findall(source))
    return tuple(sorted(p for p in read if not re.search(rf"self\.{re.escape(p)}\s*\(", source)))


def weight_read_sites(model: nn.Module) -> dict[str, str]:
    """Qualified linear name -> the class whose forward reads its weight instead of calling it."""
    read = {}
    for prefix, m in walk(model):
        for path in _weight_reads(type(m)):
            target = _join(prefix, path)
            try:
                sub = model.get_submodule(target)
            except AttributeError:
                continue
            if linear_kind(sub):
                read[target] = type(m).__name__
    return read


# --- the sites, and matching a targets spec -----------------------------------------------------------------------


def linear_sites(model: nn.Module) -> list[LinearSite]:
    """Every linear layer of `model` (in `named_modules` order) with its block, role and any reason to skip it."""
    blocks = find_blocks(model)
    where: dict[str, tuple[str, int, str]] = {}  # linear name -> (block name, block index, role)
    for bname, block, index in blocks:
        for rel, role in _block_roles(block).items():
            where.setdefault(_join(bname, rel), (bname, index, role))
    read = weight_read_sites(model)
    sites = []
    for name, m in walk(model):
        kind = linear_kind(m)
        if not kind or not name:
            continue
        if blocks:
            bname, index, role = where.get(name, (None, None, None))
        else:
            bname, index, role = _name_hints(name)
        sites.append(LinearSite(name, m, kind, *_features(m, kind), bname, index, role, _skip_reason(name, m, read)))
    return sites


def _skip_reason(name: str, m: nn.Module, read: dict[str, str]) -> str | None:
    if name in read:
        return f"{read[name]}.forward reads its weight directly: a branch would never run"
    if isinstance(m, NobleLinear):
        return ALREADY_BRANCHED
    return None


def _name_hints(name: str) -> tuple[str | None, int | None, str | None]:
    """The fallback for a model without block lists: roles from module names on the path."""
    parents = name.split(".")[:-1]
    role = ("attn" if any(_ATTN_HINT.search(p) for p in parents)
            else "mlp" if any(_MLP_HINT.search(p) for p in parents) else None)
    m = _BLOCK_INDEX.search("." + name)
    return None, int(m.group(1)) if m else None, role


def parse_targets(targets: str):
    """A targets spec -> LinearSite -> bool. `all`, `attn`, `mlp`, `alternate`, or glob patterns `a.*,b.*`."""
    spec = targets.strip()
    if spec in ("attn", "mlp"):
        return lambda s: s.role == spec
    if spec == "all":
        return lambda s: s.role is not None
    if spec == "alternate":  # every other block (0, 2, 4, ... within its list), attention and MLP
        return lambda s: s.role is not None and (s.block_index or 0) % 2 == 0
    patterns = split_list(spec)
    if not patterns or not any(ch in spec for ch in "*?[."):
        raise NobleError(
            f"unknown target {targets!r}; valid: {', '.join(TARGET_SETS)}, or glob patterns over module names "
            "such as 'blocks.*.attn.*,blocks.*.mlp.fc1'"
        )
    return lambda s: any(fnmatchcase(s.name, p) for p in patterns)


def select(model: nn.Module, targets: str) -> tuple[list[LinearSite], list[LinearSite]]:
    """(chosen, skipped): the linear layers `targets` picks that can carry a branch, and those it picks that cannot."""
    match = parse_targets(targets)
    picked = [s for s in linear_sites(model) if match(s)]
    return [s for s in picked if not s.skip], [s for s in picked if s.skip]

"""A run's optimizer (`optim.name`): AdamW over NOBLE's parameter groups, or Muon and AdamW stepped as one.

Who goes where under `optim.name: muon`:
- Muon (`muon_lr`, `muon_*`): the 2-D main weights of the linear layers in the transformer blocks
  (`layers.muon_parameters`: attention and MLP projections, with or without a branch);
- AdamW (`lr`, `betas`, `eps`, `weight_decay`, NOBLE's multipliers): everything else, i.e. embeddings, heads, norms,
  biases, anything outside the blocks, and NOBLE's branch parameters;
- `optim.branch_optimizer: muon` moves the branch matrices (W_down, W_up, r x r mixes) to Muon, at muon_lr with
  Muon's own shape adjustment and without NOBLE's multipliers (they are AdamW's; on top of Muon's normalized update
  they are what made a public port diverge). The branch's vectors stay on AdamW.

Why one optimizer object (`MuonWithAdamW`) rather than two: Lightning's automatic optimization takes a list of
optimizers as alternating steps, each with its own forward and backward, and Lightning's manual optimization would
move gradient accumulation, clipping, the schedule and the checkpointed step count into every task (the VQGAN
already does that by hand for its discriminator). One `torch.optim.Optimizer` whose `param_groups` are both
optimizers' groups (the very dicts) keeps every path of the plain AdamW run: one closure per step; gradient
accumulation by Lightning; clipping of the global norm over all parameters (Lightning reads `param_groups`); one
LambdaLR scaling every group of both from its own initial lr; the recorder's lr column (AdamW's groups come first);
16-mixed's GradScaler (which unscales `param_groups`, then calls `step()`); and a checkpoint that holds both states
(`state_dict`), from which a resumed run continues exactly. The VQGAN's manual optimization steps it like any
optimizer. Not under FSDP, whose sharded flat parameters are not matrices (refused by RunConfig's check).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from noble_cli.config import OptimConfig
from noble_cli.errors import NobleError
from noble_cli.layers import muon_parameters


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon and torch.optim.AdamW over disjoint parameters, stepped, zeroed and saved together."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        # Optimizer.__init__ is not called: it would keep a second list of groups and a state of its own, which the
        # inner optimizers' load_state_dict (it replaces their group dicts) would leave behind. The groups and the
        # state are read from the inner optimizers instead; these are the attributes the base class's hooks read.
        self.adamw, self.muon = adamw, muon
        self.defaults: dict = {}
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.adamw, self.muon

    @property
    def param_groups(self) -> list[dict]:
        """AdamW's groups, then Muon's: the dicts the inner optimizers step with (a scheduler's lr lands there)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> dict:
        """Per-parameter state of both (the same dicts: moving a tensor in one moves it in the optimizer)."""
        return {p: s for opt in self.optimizers for p, s in opt.state.items()}

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"adamw", "muon"}:
            raise NobleError("the checkpoint's optimizer state is not Muon+AdamW (it was saved by another "
                             "optim.name): resume with the optim settings it was trained with")
        self.adamw.load_state_dict(state_dict["adamw"])
        self.muon.load_state_dict(state_dict["muon"])

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add groups to MuonWithAdamW's .adamw or .muon")

    def __repr__(self) -> str:
        return f"MuonWithAdamW(\n{self.adamw!r},\n{self.muon!r})"


def _without(groups: list[dict], taken: set[int]) -> list[dict]:
    """AdamW's groups minus the parameters another optimizer takes (groups left empty dropped)."""
    out = []
    for g in groups:
        params = [p for p in g["params"] if id(p) not in taken]
        if params:
            out.append({**g, "params": params})
    return out


def build_optimizer(model: nn.Module, o: OptimConfig, adamw_groups: list[dict], fused: bool
                    ) -> torch.optim.Optimizer:
    """AdamW over `adamw_groups` (NOBLE's groups, lr multipliers in them), or Muon+AdamW for `optim.name: muon`."""
    def adamw(groups):
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)

    if o.name == "adamw":
        return adamw(adamw_groups)
    matrices = muon_parameters(model, branch_matrices=o.branch_optimizer == "muon")
    if not matrices:
        raise NobleError("optim.name muon found no matrix in the model's transformer blocks for Muon; valid for "
                         "this model: adamw")
    muon = torch.optim.Muon(
        _muon_groups(matrices, o), lr=o.muon_lr, weight_decay=o.muon_weight_decay, momentum=o.muon_momentum,
        nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps, adjust_lr_fn=o.muon_adjust_lr_fn,
    )
    return MuonWithAdamW(adamw(_without(adamw_groups, {id(p) for p, _ in matrices})), muon)


def _muon_groups(matrices: list[tuple[nn.Parameter, bool]], o: OptimConfig) -> list[dict]:
    """One group at muon_lr, plus one per weight stored (in, out) (GPT-2's Conv1D) whose lr undoes Muon's reading of
    the shape: torch scales a step by a function of (rows, cols) taken as (out, in), so without the correction a
    transposed c_fc would get the (in, out) scale, and a baseline that keeps Conv1D would train at other per-layer
    rates than its NOBLE run, whose NobleLinear stores (out, in). Newton-Schulz itself is transpose-invariant."""
    fn = o.muon_adjust_lr_fn
    plain = [p for p, transposed in matrices if not transposed]
    groups = [{"params": plain}] if plain else []
    for p, transposed in matrices:
        if transposed:
            rows, cols = p.shape
            fix = _muon_shape_scale(fn, cols, rows) / _muon_shape_scale(fn, rows, cols)
            # decoupled decay is lr x weight_decay: divided back, so the decay stays what every other weight gets
            groups.append({"params": [p], "lr": o.muon_lr * fix, "weight_decay": o.muon_weight_decay / fix})
    return groups


def _muon_shape_scale(adjust_lr_fn: str, rows: int, cols: int) -> float:
    """The factor torch.optim.Muon applies to a (rows, cols) matrix's step (its private `_adjust_lr`, at lr 1)."""
    from torch.optim._muon import _adjust_lr  # private, so imported where used; tests/test_muon.py pins the values

    return _adjust_lr(1.0, adjust_lr_fn, torch.Size((rows, cols)))

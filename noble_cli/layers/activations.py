"""The registry of NOBLE branch nonlinearities.

Each entry builds the module that sits in the rank-r bottleneck between `down` and `up`. A module may change the
width (SwiGLU halves it), so the registry also records how wide `down`'s output must be for a given rank, so that
every branch hands exactly `rank` channels to `up`.

Adding an activation is one `register(...)` call. A module with learnable parameters that should not train at the
base learning rate declares them in `lr_roles` (parameter name -> "mix", "freq" or "phase"; see
`noble_cli.layers.apply.lr_multiplier` for what each role gets): nothing is matched by parameter names elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from noble_cli.errors import choices_error


class CosAct(nn.Module):
    """cos(freq * z + phase) with a learnable frequency and phase per channel."""

    lr_roles = {"freq": "freq", "phase": "phase"}

    def __init__(self, width: int):
        super().__init__()
        self.freq = nn.Parameter(torch.empty(width))
        self.phase = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.freq.uniform_(0.8, 1.2)
            self.phase.normal_(0.0, 0.1).fmod_(2 * math.pi)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cos(self.freq * z + self.phase)


class CosNet(nn.Module):
    """CosAct_2(mix(CosAct_1(h))), the paper's best branch nonlinearity.

    Parameter names (`freq1`, `phase1`, `mix`, `freq2`, `phase2`) are a stable API: checkpoints and the fused
    Triton kernel depend on them.
    """

    lr_roles = {"freq1": "freq", "phase1": "phase", "freq2": "freq", "phase2": "phase", "mix.weight": "mix"}

    def __init__(self, width: int, mix_init_scale: float = 0.5):
        super().__init__()
        self.freq1 = nn.Parameter(torch.empty(width))
        self.phase1 = nn.Parameter(torch.empty(width))
        self.mix = nn.Linear(width, width)
        self.freq2 = nn.Parameter(torch.empty(width))
        self.phase2 = nn.Parameter(torch.empty(width))
        self.mix_init_scale = mix_init_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for freq, phase in ((self.freq1, self.phase1), (self.freq2, self.phase2)):
                freq.uniform_(0.8, 1.2)
                phase.normal_(0.0, 0.1).fmod_(2 * math.pi)
            self.mix.reset_parameters()  # PyTorch's default bias init, as the reference keeps it
            self.mix.weight.normal_(0.0, self.mix_init_scale / math.sqrt(self.mix.in_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        c1 = torch.cos(self.freq1 * h + self.phase1)
        return torch.cos(self.freq2 * self.mix(c1) + self.phase2)


class CosNetDouble(nn.Module):
    """Three CosActs with two r x r mixing layers between them."""

    lr_roles = {**{f"cos{i}.{name}": name for i in (1, 2, 3) for name in ("freq", "phase")},
                "mix.weight": "mix", "mix2.weight": "mix"}

    def __init__(self, width: int):
        super().__init__()
        self.cos1, self.cos2, self.cos3 = CosAct(width), CosAct(width), CosAct(width)
        self.mix = nn.Linear(width, width)
        self.mix2 = nn.Linear(width, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for layer in (self.mix, self.mix2):
                layer.reset_parameters()
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.in_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.cos3(self.mix2(self.cos2(self.mix(self.cos1(h)))))


class TwoLayer(nn.Module):
    """act -> r x r linear (`mix`) -> act: the `_net` form of a fixed activation."""

    lr_roles = {"mix.weight": "mix"}

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], width: int, mix_init_scale: float = 0.5):
        super().__init__()
        self.fn = act
        self.mix = nn.Linear(width, width)
        self.mix_init_scale = mix_init_scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mix.reset_parameters()
            self.mix.weight.normal_(0.0, self.mix_init_scale / math.sqrt(self.mix.in_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(self.mix(self.fn(h)))


class Pointwise(nn.Module):
    """A fixed elementwise activation (no parameters)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def extra_repr(self) -> str:
        return self.name

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)


class SwiGLU(nn.Module):
    """silu(gate) * value over the two halves of a 2r-wide bottleneck, giving r channels."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, value = h.chunk(2, dim=-1)
        return F.silu(gate) * value


@dataclass(frozen=True)
class ActivationSpec:
    build: Callable[[int], nn.Module]  # rank -> module taking down's output, returning `rank` channels
    down_width: Callable[[int], int] = lambda r: r  # width of down's output for rank r
    down_bias: bool = True  # a linear branch needs no bias: it would only duplicate the main bias


def _leaky(h: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(h, 0.01)


ACTIVATIONS: dict[str, ActivationSpec] = {}


def register(name: str, spec: ActivationSpec, replace: bool = False) -> None:
    """Add an activation under `name`. A name already taken is refused unless `replace=True`: a second `cosnet`
    silently replacing the first would change every run that names it."""
    if name in ACTIVATIONS and not replace:
        raise ValueError(f"activation {name!r} is already registered; pass replace=True to replace it")
    ACTIVATIONS[name] = spec


register("identity", ActivationSpec(lambda r: nn.Identity(), down_bias=False))
register("cos", ActivationSpec(CosAct))
register("cosnet", ActivationSpec(CosNet))
register("cos_net_double", ActivationSpec(CosNetDouble))
register("swiglu", ActivationSpec(lambda r: SwiGLU(), down_width=lambda r: 2 * r))
for _name, _fn in {"gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh, "leakyrelu": _leaky}.items():
    register(_name, ActivationSpec(lambda r, f=_fn, n=_name: Pointwise(f, n)))
    register(f"{_name}_net", ActivationSpec(lambda r, f=_fn: TwoLayer(f, r)))

# The reference code spells CosNet `cos_net`; accept it as an alias. (`none` is not an activation: in a config it
# means the baseline, without a branch.)
ALIASES = {"cos_net": "cosnet", "linear": "identity"}


def resolve_activation(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise choices_error("activation", name, list(ACTIVATIONS))
    return name


def activation_spec(name: str) -> ActivationSpec:
    return ACTIVATIONS[resolve_activation(name)]

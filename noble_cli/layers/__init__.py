"""The NOBLE layer library: one place, used by every task."""

from noble_cli.layers.activations import (
    ACTIVATIONS,
    activation_spec,
    register,
    resolve_activation,
)
from noble_cli.layers.apply import (
    TARGET_SETS,
    LRMultipliers,
    ParamCount,
    apply_noble,
    count_parameters,
    muon_parameters,
    noble_layers,
    param_groups,
    set_kernel,
)
from noble_cli.layers.linear import KERNELS, NobleLinear

__all__ = [
    "ACTIVATIONS", "KERNELS", "TARGET_SETS", "LRMultipliers", "NobleLinear", "ParamCount", "activation_spec",
    "apply_noble", "count_parameters", "muon_parameters", "noble_layers", "param_groups", "register",
    "resolve_activation", "set_kernel",
]

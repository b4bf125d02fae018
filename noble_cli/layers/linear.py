"""NobleLinear: nn.Linear plus a permanent nonlinear low-rank branch.

    y = x W^T + b + up(act(down(x)))

`down` is in -> r (with a bias, zero at init), `act` is a registered nonlinearity working in the r-wide bottleneck,
`up` is r -> out without a bias and starts near zero, so at init the layer is almost its main linear map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from noble_cli.errors import NobleError
from noble_cli.layers.activations import activation_spec, resolve_activation
from noble_cli.layers.implementation import KERNELS, import_noble_kernels, runs_fused


class NobleLinear(nn.Linear):
    """A drop-in nn.Linear (same `in_features`, `out_features`, `weight`, `bias`, forward) with a NOBLE branch.

    Attribute names `down`, `up`, `act` and, for CosNet, `act.freq1/phase1/mix/freq2/phase2` are a stable API.
    `kernel` picks the implementation of the forward: "torch" (any activation, any device) or "triton"
    (fused CosNet kernels on CUDA, or on the CPU under TRITON_INTERPRET=1; falls back to torch where the fused path
    does not apply: another activation, or a device the kernels cannot run on). Which one a run's layers get, and
    the self-check before a run trusts the fused path, are decided in noble_cli/layers/implementation.py.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 32,
        activation: str = "cosnet",
        up_init_scale: float = 0.01,
        kernel: str = "torch",
        device=None,
        dtype=None,
    ):
        if not 1 <= rank < min(in_features, out_features):
            raise NobleError(
                f"rank {rank} is invalid for a {in_features}->{out_features} linear: "
                f"it must be >= 1 and < min(in, out) = {min(in_features, out_features)}"
            )
        if kernel not in KERNELS:
            raise NobleError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = resolve_activation(activation)
        spec = activation_spec(self.activation)
        self.rank = rank
        self.up_init_scale = up_init_scale
        self.kernel = kernel
        self.down = nn.Linear(in_features, spec.down_width(rank), bias=spec.down_bias, device=device, dtype=dtype)
        self.act = spec.build(rank).to(device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.reset_branch()

    def reset_branch(self) -> None:
        """The paper's branch init: down ~ N(0, 1/in), up ~ N(0, (0.01/sqrt(r))^2), act's own init."""
        with torch.no_grad():
            self.down.weight.normal_(0.0, 1.0 / math.sqrt(self.in_features))
            if self.down.bias is not None:
                self.down.bias.zero_()
            self.up.weight.normal_(0.0, self.up_init_scale / math.sqrt(self.rank))
        if hasattr(self.act, "reset_parameters"):
            self.act.reset_parameters()

    def reset_main(self, scale: float = 0.5) -> None:
        """The paper's main-weight init: N(0, (scale/sqrt(in))^2), bias 0 (half the usual scale by default)."""
        with torch.no_grad():
            self.weight.normal_(0.0, scale / math.sqrt(self.in_features))
            if self.bias is not None:
                self.bias.zero_()

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_fused(self.kernel, self.activation, x):
            a = self.act
            return import_noble_kernels().cosnet_linear(
                x, self.weight, self.bias, self.down.weight, self.down.bias,
                a.freq1, a.phase1, a.mix.weight, a.mix.bias, a.freq2, a.phase2, self.up.weight,
            )
        return F.linear(x, self.weight, self.bias) + self.branch(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, activation={self.activation}, kernel={self.kernel}"

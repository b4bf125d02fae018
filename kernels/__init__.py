"""noble_kernels: fused Triton kernels for NOBLE layers (installed from the repository's `kernels/` folder).

    from noble_kernels import cosnet_linear, available
    y = cosnet_linear(x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias,
                      freq2, phase2, up_weight)

Design switches: `KernelOptions`, `options(**overrides)` (a context manager), `current_options()`.
Launch configs: `autotune_space()`, `forced_config(kernel_name, index)`. Correctness checks against float64:
`noble_kernels.testing`.

Importing this package needs only torch; triton is imported at the first kernel launch. Kernels run on CUDA, or on
CPU tensors when TRITON_INTERPRET=1 was set before that first launch (Triton decides interpreter-or-compiler when
a kernel is decorated, i.e. when `noble_kernels.cosnet` / `noble_kernels.fused_linear` are first imported).
See docs/kernels.md for the design.
"""

from __future__ import annotations

import sys

import torch

from . import testing
from ._common import interpret_mode, poisoned, triton_importable
from .op import GEMM_BACKENDS, cosnet_linear
from .options import KernelOptions, current_options, options
from .tuning import autotune_space, forced_config

__all__ = ["available", "cosnet_linear", "poisoned", "GEMM_BACKENDS", "KernelOptions", "current_options", "options",
           "autotune_space", "forced_config", "testing"]


def available(device: "torch.device | str | None" = None) -> bool:
    """Whether the fused path can run on `device` (default: CUDA if present, else CPU).

    CUDA: a GPU and triton. CPU: triton and TRITON_INTERPRET=1, and the kernel modules not yet decorated in
    compiled mode (they are decorated once, at their first import)."""
    if not triton_importable():
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type != "cpu" or not interpret_mode():
        return False
    mod = sys.modules.get(__name__ + ".cosnet")
    if mod is not None:  # already decorated: interpreted only if TRITON_INTERPRET was set at that time
        return type(mod._down_cosnet_fwd_kernel).__name__ == "InterpretedFunction"
    return True

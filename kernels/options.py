"""Process-wide design switches of the fused path, so that one GPU run can time the alternatives side by side.

    with noble_kernels.options(dw="splitk", partials="finalize"):
        y = cosnet_linear(...)          # forward and the backward it records use these options

Every switch is verified against float64 under the interpreter (tests/test_kernel_options.py); the defaults are
today's kernels until a GPU measurement picks others (docs/kernels.md, "Switches").

The options in force when `cosnet_linear` is called are passed to the custom ops as string arguments, so a
torch.compile'd caller sees them as graph constants and recompiles when they change instead of running stale ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import ClassVar, Optional

_GEMM_ENV = "NOBLE_KERNELS_GEMM"


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """gemm:      "triton" = our GEMM kernels for y, dX and the weight gradients; "torch" = cuBLAS for all three
                  (dw and dual_gemm choose among Triton kernels, so they have no effect under gemm="torch").
    dw:           weight gradients: "fused" = one launch, every tile reducing over all tokens; "splitk" = the same
                  tiles over a fixed number of token ranges, fp32 partials summed in a fixed order (no atomics);
                  "cublas" = torch.mm for dW, dW_up, dW_down.
    dual_gemm:    the branch's r extra K steps: "two_loops" = a second loop after the main K loop drains;
                  "one_loop" = one software-pipelined loop over K1 + K2.
    partials:     per-block partial gradients (CosNet parameters, split-K): "host" = torch sums; "finalize" = one
                  kernel for all of them."""

    gemm: str = "triton"
    dw: str = "fused"
    dual_gemm: str = "two_loops"
    partials: str = "host"

    _CHOICES: ClassVar[dict] = {
        "gemm": ("triton", "torch"),
        "dw": ("fused", "splitk", "cublas"),
        "dual_gemm": ("two_loops", "one_loop"),
        "partials": ("host", "finalize"),
    }

    def __post_init__(self):
        for name, valid in self._CHOICES.items():
            value = getattr(self, name)
            if value not in valid:
                raise ValueError(f"KernelOptions.{name}={value!r}; valid: {', '.join(valid)}")

    @classmethod
    def choices(cls) -> dict:
        """field -> tuple of its valid values."""
        return dict(cls._CHOICES)

    def as_args(self) -> tuple:
        """The options as the custom ops' trailing string arguments (field order)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


_ACTIVE: Optional[KernelOptions] = None


def default_gemm() -> str:
    gemm = os.environ.get(_GEMM_ENV, "triton")
    valid = KernelOptions.choices()["gemm"]
    if gemm not in valid:
        raise ValueError(f"{_GEMM_ENV}={gemm!r}; valid: {', '.join(valid)}")
    return gemm


def current_options() -> KernelOptions:
    """The options `cosnet_linear` uses now: those of the innermost `options()` block, else the defaults (with
    gemm from NOBLE_KERNELS_GEMM)."""
    return _ACTIVE if _ACTIVE is not None else KernelOptions(gemm=default_gemm())


@contextlib.contextmanager
def options(**overrides):
    """Set process-wide options for the `cosnet_linear` calls made inside this block (nested blocks override
    the fields they name). Enter it outside a torch.compile'd function: the function then recompiles for it."""
    global _ACTIVE
    unknown = sorted(set(overrides) - set(KernelOptions.choices()))
    if unknown:
        raise ValueError(f"noble_kernels.options: unknown option(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(KernelOptions.choices())}")
    new = dataclasses.replace(current_options(), **overrides)
    old, _ACTIVE = _ACTIVE, new
    try:
        yield new
    finally:
        _ACTIVE = old

"""Which implementation a NOBLE branch runs, and why: the one place that decides it.

Two implementations exist: `torch` (NobleLinear's own modules: any activation, any device) and `triton` (the fused
CosNet kernels of `noble_kernels`). Everything that needs to know which one runs asks this module: NobleLinear's
forward (`runs_fused`), the task that builds the model (`plan`), `noble train`'s self-check before the first step
(`self_check`, whose verdict meta.json records) and `noble bench` (`fused_unavailable_reason`,
`import_noble_kernels`).

The decision has two stages:

1. `plan(branch, requested, device_type)`: static. A CosNet branch with `noble.kernel` triton, or auto on CUDA,
   plans the fused path; everything else runs torch, with the reason.
2. `self_check(shapes, device, precision)`: the fused path, before it trains anything, on each distinct layer shape
   of the model: a few hundred tokens under the run's precision, the output and every gradient compared with the
   torch path's and both with a float64 evaluation of the same layer. An exception or an error beyond what the
   precision itself gives fails it. `noble train` then falls back to torch (auto) or stops with a one-line error
   (an explicit triton), see noble_cli/train/kernel_check.py.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

KERNELS = ("torch", "triton")  # what runs
REQUESTS = ("auto",) + KERNELS  # what `noble.kernel` / `--kernel` may ask for
FUSED_ACTIVATION = "cosnet"  # the only branch the fused kernels implement


def has_fused_kernel(branch: str) -> bool:
    """Whether the fused kernels implement this branch (activation name): the one question the config (whether
    `noble.kernel` is part of a run's identity and label), bench and the dispatch below ask."""
    return branch == FUSED_ACTIVATION

_SOURCE_KERNELS = Path(__file__).resolve().parents[2] / "kernels"
# What noble uses of noble_kernels (kernels/__init__.py exports it): checked once at import, so that an older copy
# installed elsewhere fails loudly there instead of silently shrinking what bench tests or how layers dispatch.
KERNELS_API = ("available", "cosnet_linear", "KernelOptions", "options", "current_options", "autotune_space",
               "forced_config", "testing", "tuning")
_LOADED = None  # the noble_kernels module, once imported


# ---------------------------------------------------------------------------------------------------------------
# Importing the kernels

def import_noble_kernels():
    """`noble_kernels`: as already imported, else as installed (`pip install -e .` maps kernels/ to it), else
    straight from this source checkout's kernels/ (a checkout that was never pip-installed, or a machine without
    network to install it). Raises ImportError when none is there.

    The one loader: NobleLinear, the self-check and `noble bench` all go through it, so they never see two copies
    (two copies would register the same torch custom ops twice, which torch refuses)."""
    global _LOADED
    if _LOADED is not None:  # the per-call path of NobleLinear: a global read, which torch.compile traces
        return _LOADED
    noble_kernels = sys.modules.get("noble_kernels")
    if noble_kernels is None:
        noble_kernels = _load_noble_kernels()
    missing = [name for name in KERNELS_API if not hasattr(noble_kernels, name)]
    if missing:
        raise ImportError(f"noble_kernels at {getattr(noble_kernels, '__file__', '?')} lacks {', '.join(missing)}: "
                          "an older copy; reinstall from this checkout (pip install -e .)")
    _LOADED = noble_kernels
    return noble_kernels


def _load_noble_kernels():
    try:
        import noble_kernels
    except ImportError:
        init = _SOURCE_KERNELS / "__init__.py"
        if not init.exists():
            raise
        spec = importlib.util.spec_from_file_location("noble_kernels", init,
                                                      submodule_search_locations=[str(_SOURCE_KERNELS)])
        noble_kernels = importlib.util.module_from_spec(spec)
        sys.modules["noble_kernels"] = noble_kernels
        try:
            spec.loader.exec_module(noble_kernels)
        except BaseException:
            sys.modules.pop("noble_kernels", None)
            raise
    return noble_kernels


def fused_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the fused kernels cannot run on `device`, or None if they can: CUDA with triton, or the CPU under
    TRITON_INTERPRET=1 (Triton's numpy interpreter: tests only)."""
    device = torch.device(device)
    try:
        nk = import_noble_kernels()
    except Exception as e:  # ImportError, or a broken checkout raising something else
        return f"noble_kernels cannot be imported ({type(e).__name__}: {_first_line(e)})"
    if nk.available(device):
        return None
    if device.type == "cpu":
        return "the fused kernels run on the CPU only in Triton's interpreter (TRITON_INTERPRET=1)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if device.type == "cuda":
        return "triton is not installed"
    return f"the fused kernels do not run on {device.type}"


def runs_fused(kernel: str, activation: str, x: torch.Tensor) -> bool:
    """NobleLinear's per-call dispatch: its `kernel` asks for triton, its branch is CosNet, and the kernels can
    take `x` (any CUDA tensor; a CPU tensor only in Triton's interpreter). Anything else runs the torch path."""
    if kernel != "triton" or not has_fused_kernel(activation):
        return False
    if x.is_cuda:
        return True
    return fused_unavailable_reason(x.device) is None


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the plan

@dataclass(frozen=True)
class Choice:
    """The implementation of a model's NOBLE layers: what was asked for, what runs and why (meta.json's
    `kernel`, `kernel_requested`, `kernel_reason`). `pending` is true until the self-check has passed."""

    requested: str
    kernel: str
    reason: str
    pending: bool = False

    def meta(self) -> dict:
        return {"kernel": self.kernel, "kernel_requested": self.requested, "kernel_reason": self.reason}


def plan(branch: str, requested: str, device_type: str) -> Choice:
    """The implementation before the self-check. `branch`: the activation or "none"; `requested`: auto | torch |
    triton; `device_type`: where the run trains ("cuda" or "cpu")."""
    if requested not in REQUESTS:
        raise ValueError(f"unknown kernel {requested!r}; valid: {', '.join(REQUESTS)}")
    if branch == "none":
        return Choice(requested, "torch", "no NOBLE branch")
    if not has_fused_kernel(branch):
        return Choice(requested, "torch", f"the fused kernels implement the {FUSED_ACTIVATION} branch only, not "
                                          f"{branch}")
    if requested == "torch":
        return Choice(requested, "torch", "noble.kernel is torch")
    if device_type != "cuda" and requested == "auto":
        return Choice(requested, "torch", f"auto picks the fused kernels on CUDA only, this run is on {device_type}")
    if device_type != "cuda":
        # an explicit triton off CUDA runs the fused path only in Triton's interpreter (how CI tests it); elsewhere
        # NobleLinear runs torch, and meta.json says so
        why = fused_unavailable_reason(device_type)
        if why:
            return Choice(requested, "torch", f"noble.kernel is triton, but {why}")
    # On CUDA, whether triton and noble_kernels are there is found out by the self-check like any other failure.
    return Choice(requested, "triton", "fused kernels, pending their self-check", pending=True)

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""

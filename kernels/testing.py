"""Correctness of the fused path against float64, for tests and for the GPU suite (CUDA, or CPU under
TRITON_INTERPRET=1).

    r = noble_kernels.testing.check(16384, 1024, 1024, 64, torch.bfloat16, "cuda", bias=False, seed=0,
                                    options={"dw": "splitk"})
    r["ok"], r["errors"]["weight"], r["tolerance"], r["kernels"]

Errors are max |fused - reference| / max |reference| per tensor (the output and each gradient): robust for
random O(1) data, where an element-wise relative error would blow up near zeros.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from . import _common, tuning
from .op import cosnet_linear
from .options import KernelOptions, current_options, options as options_block

# cosnet_linear's arguments, in order
ARGS = ("x", "weight", "bias", "down_weight", "down_bias", "freq1", "phase1", "mix_weight", "mix_bias", "freq2",
        "phase2", "up_weight")
HALF = (torch.bfloat16, torch.float16)


def reference_cosnet_linear(x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2,
                            phase2, up_weight) -> torch.Tensor:
    """The layer from its formula, in float64 (inputs are upcast; None biases are left out). Differentiable:
    autograd gives every gradient (exactly float64 ones when the leaves are float64)."""
    f = [None if t is None else t.to(torch.float64)
         for t in (x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2,
                   up_weight)]
    x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2, up_weight = f
    h = x @ down_weight.T + (0 if down_bias is None else down_bias)
    c1 = torch.cos(freq1 * h + phase1)
    z = c1 @ mix_weight.T + (0 if mix_bias is None else mix_bias)
    c = torch.cos(freq2 * z + phase2)
    return x @ weight.T + (0 if bias is None else bias) + c @ up_weight.T


def make_inputs(m: int, k: int, n: int, r: int, dtype: torch.dtype = torch.float32, device="cpu",
                bias: bool = True, seed: int = 0) -> dict:
    """Fresh random inputs for `cosnet_linear` (keys ARGS) plus "grad_out", an output gradient (m, n).

    x ~ N(0, 1) (what a LayerNorm feeds the layer); weights at NOBLE's init scales (noble_cli/layers/linear.py),
    except W_up ~ N(0, (0.5/sqrt(r))^2) instead of 0.01/sqrt(r), so that the branch adds as much to y as the
    main path and an error in it is not hidden below the tolerance, and biases drawn like nn.Linear's instead of 0
    (a forward that dropped a zero bias would pass). bias=False drops the main bias only (GPT's layers).
    dtype is the compute dtype: bf16/fp16 return fp32 tensors, the master weights autocast casts, as in training."""
    device = torch.device(device)
    store = torch.float32 if dtype in HALF else dtype
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, device=device, dtype=store) * std

    def uniform(*shape, lo, hi):
        return torch.rand(*shape, generator=gen, device=device, dtype=store) * (hi - lo) + lo

    t = {"x": normal(m, k), "weight": normal(n, k, std=0.5 / math.sqrt(k)),
         "bias": uniform(n, lo=-k ** -0.5, hi=k ** -0.5) if bias else None,
         "down_weight": normal(r, k, std=1 / math.sqrt(k)), "down_bias": uniform(r, lo=-k ** -0.5, hi=k ** -0.5),
         "freq1": uniform(r, lo=0.8, hi=1.2), "phase1": normal(r, std=0.1).fmod(2 * math.pi),
         "mix_weight": normal(r, r, std=0.5 / math.sqrt(r)), "mix_bias": uniform(r, lo=-r ** -0.5, hi=r ** -0.5),
         "freq2": uniform(r, lo=0.8, hi=1.2), "phase2": normal(r, std=0.1).fmod(2 * math.pi),
         "up_weight": normal(n, r, std=0.5 / math.sqrt(r))}
    t["grad_out"] = normal(m, n)
    return t


def tolerance_for(dtype: torch.dtype, device, m: int) -> float:
    """The largest relative error that rounding alone explains. bf16/fp16 compute: 4 machine epsilons of that
    dtype (inputs, the r-wide tensors and the output are rounded to it). fp32 with TF32 GEMMs (when torch allows
    TF32): 4 TF32 epsilons (10-bit mantissa). Exact fp32: fp32 accumulation over up to m tokens, 8 eps sqrt(m),
    and at least 2e-5."""
    device = torch.device(device)
    if dtype in HALF:
        return 4 * torch.finfo(dtype).eps
    if dtype == torch.float32 and _common.dot_precision(dtype, device) == "tf32":
        return 4 * 2.0 ** -10
    return max(2e-5, 8 * torch.finfo(torch.float32).eps * math.sqrt(m))


def _max_rel_error(got: Optional[torch.Tensor], want: torch.Tensor) -> float:
    if got is None or not torch.isfinite(got).all():
        return math.inf
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def check(m: int, k: int, n: int, r: int, dtype: torch.dtype = torch.float32, device="cpu", bias: bool = True,
          seed: int = 0, options: Union[KernelOptions, dict, None] = None,
          tolerance: Optional[float] = None) -> dict:
    """Run cosnet_linear forward and backward on `make_inputs(...)` (under autocast for bf16/fp16, as training
    does; every kernel output starts as NaN, so an element a kernel never writes fails) and compare the output
    and every gradient with float64 autograd on the same input values.

    options: KernelOptions, or a dict of overrides of the current options. Returns {"errors": {tensor: max
    relative error} ("y", "x" and each parameter present), "worst", "max_error", "finite", "tolerance", "ok",
    "kernels": [{"kernel", "config"}] (each launch, with the config it ran), "options", and the arguments}."""
    device = torch.device(device)
    opts = options if isinstance(options, KernelOptions) else dataclasses.replace(current_options(),
                                                                                   **(options or {}))
    tol = tolerance if tolerance is not None else tolerance_for(dtype, device, m)
    inputs = make_inputs(m, k, n, r, dtype, device, bias, seed)
    g = inputs.pop("grad_out")
    leaves = {name: None if t is None else t.requires_grad_(True) for name, t in inputs.items()}
    with options_block(**dataclasses.asdict(opts)), tuning.record_launches() as launches, _common.poisoned(), \
            torch.autocast(device.type, dtype=dtype, enabled=dtype in HALF):
        y = cosnet_linear(**leaves)
    with tuning.record_launches() as bwd_launches, _common.poisoned():
        y.backward(g.to(y.dtype))

    ref = {name: None if t is None else t.detach().double().requires_grad_(True) for name, t in inputs.items()}
    y64 = reference_cosnet_linear(**ref)
    y64.backward(g.double())
    errors = {"y": _max_rel_error(y.detach(), y64.detach())}
    errors.update({name: _max_rel_error(leaves[name].grad, t.grad) for name, t in ref.items() if t is not None})
    worst = max(errors, key=errors.get)
    finite = bool(torch.isfinite(y).all()) and all(
        leaves[name].grad is not None and bool(torch.isfinite(leaves[name].grad).all()) for name in errors
        if name != "y")
    return {"m": m, "k": k, "n": n, "r": r, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
            "bias": bias, "seed": seed, "options": dataclasses.asdict(opts), "errors": errors, "worst": worst,
            "max_error": errors[worst], "finite": finite, "tolerance": tol,
            "ok": finite and errors[worst] <= tol,
            "kernels": [{"kernel": name, "config": cfg} for name, cfg in launches + bwd_launches]}

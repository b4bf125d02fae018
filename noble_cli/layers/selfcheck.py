"""Stage 2 of the implementation decision (stage 1: noble_cli/layers/implementation.py): the self-check of the
fused CosNet kernels on each distinct layer shape of a model, against the torch path and a float64 reference,
before a run trusts them. `noble train` runs it before the first step (noble_cli/train/kernel_check.py); the GPU
suite runs it too. Its own module because it builds NobleLinear layers, which themselves ask the decision module
which path to run.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import torch

from noble_cli.layers.implementation import (
    FUSED_ACTIVATION,
    _first_line,
    import_noble_kernels,
    runs_fused,
)
from noble_cli.layers.linear import NobleLinear


@dataclass(frozen=True)
class LayerShape:
    in_features: int
    out_features: int
    rank: int
    bias: bool

    def __str__(self) -> str:
        return f"{self.in_features}->{self.out_features} r{self.rank}" + ("" if self.bias else " (no bias)")


def layer_shapes(model: torch.nn.Module) -> list[LayerShape]:
    """The distinct shapes of the model's NOBLE layers that would take the fused path, in model order."""
    seen: dict[LayerShape, None] = {}
    for m in model.modules():
        if isinstance(m, NobleLinear) and m.activation == FUSED_ACTIVATION:
            seen.setdefault(LayerShape(m.in_features, m.out_features, m.rank, m.bias is not None))
    return list(seen)


@dataclass
class ShapeCheck:
    """One shape's verdict. `errors`/`tolerance`: per tensor ("y", "x", then each parameter), the fused path's
    max error relative to the tensor's largest float64 value, and the bound it had to stay within."""

    shape: LayerShape
    ok: bool
    error: str | None = None
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def describe(self) -> str:
        return f"{self.shape}: {self.error}"


@dataclass
class Verdict:
    ok: bool
    checks: list[ShapeCheck]
    seconds: float

    @property
    def failure(self) -> ShapeCheck | None:
        return next((c for c in self.checks if not c.ok), None)

    def summary(self) -> dict:
        """What meta.json keeps of it (`kernel_check`)."""
        return {"ok": self.ok, "seconds": round(self.seconds, 3),
                "shapes": [{"shape": str(c.shape), "ok": c.ok, "error": c.error,
                            "max_rel_error": {k: float(f"{v:.3g}") for k, v in c.errors.items()}}
                           for c in self.checks]}


CHECK_TOKENS = 256  # "a few hundred tokens": every kernel runs several programs along the tokens
INTERPRETER_TOKENS = 64  # in Triton's CPU interpreter (tests), where every tile costs numpy time
# Precision names as Lightning's Trainer reports them -> (parameter dtype, autocast dtype or None).
_PRECISIONS = {
    "32": (torch.float32, None), "32-true": (torch.float32, None),
    "bf16-mixed": (torch.float32, torch.bfloat16), "16-mixed": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None), "16-true": (torch.float16, None), "bf16": (torch.bfloat16, None),
    "64-true": (torch.float64, None), "64": (torch.float64, None),
}
_CACHE: dict[tuple, ShapeCheck] = {}


def clear_cache() -> None:
    """Forget every verdict of this process (tests swap the kernels for faulty ones)."""
    _CACHE.clear()




def _options_key():
    """The kernels' current design switches (`noble_kernels.current_options()`, where that exists): a verdict
    holds for one set of switches."""
    nk = sys.modules.get("noble_kernels")
    current = getattr(nk, "current_options", None)
    try:
        return repr(current()) if current else None
    except Exception:
        return None


def _init_for_check(layer: torch.nn.Module, gen: torch.Generator) -> None:
    """Parameters drawn so that every term of the output and every gradient is O(1): with the paper's init the
    branch is ~0.01 of the output, and a wrong branch would hide under the main GEMM's rounding."""
    k, r = layer.in_features, layer.rank
    scales = {"weight": k ** -0.5, "bias": 0.5, "down.weight": k ** -0.5, "down.bias": 0.5, "act.phase1": 1.0,
              "act.phase2": 1.0, "act.mix.weight": r ** -0.5, "act.mix.bias": 0.5, "up.weight": r ** -0.5}
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("act.freq"):
                value = torch.rand(p.shape, generator=gen, dtype=torch.float64) + 0.5
            else:
                value = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scales.get(name, 1.0)
            p.copy_(value.to(p.dtype))


def _run_layer(layer, x, g, autocast_dtype):
    """Output and gradients (x first, then the parameters by name) of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = layer(xi)
    y.backward(g.to(y.dtype))
    out = {"y": y.detach(), "x": xi.grad}
    for name, p in layer.named_parameters():
        out[name] = p.grad
    return out


def _rel_err(got: torch.Tensor | None, want: torch.Tensor, name: str) -> float:
    if got is None:
        raise RuntimeError(f"no gradient for {name}")
    if tuple(got.shape) != tuple(want.shape):
        raise RuntimeError(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    got = got.detach().to(torch.float64)
    if not torch.isfinite(got).all():
        raise RuntimeError(f"{name} has non-finite values")
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_shape(shape: LayerShape, device: torch.device | str, precision: str = "32-true",
                tokens: int = CHECK_TOKENS, seed: int = 0) -> ShapeCheck:
    """The fused path of one layer shape against the torch path, under `precision` (a Lightning precision name).

    Both paths run the same layer (same random O(1) parameters, input and output gradient) under the run's
    precision; a float64 copy of the layer gives the reference. The fused path passes when its output and every
    gradient are finite and within max(4 x the torch path's own error, 4 eps of the compute dtype, 2e-5) of the
    reference, relative to the tensor's largest value: "within what the precision itself gives".
    Never raises: an exception anywhere is a failed check. Leaves the global RNG state as it found it."""
    device = torch.device(device)
    param_dtype, autocast_dtype = _PRECISIONS.get(str(precision), (torch.float32, None))
    compute = autocast_dtype or param_dtype
    t0 = time.perf_counter()
    result = ShapeCheck(shape, ok=False)
    try:
        nk = import_noble_kernels()
        # the check draws from its own generator, and fork_rng undoes what the layer's own init draws: a run
        # that falls back must see the very random numbers a torch run sees
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else [], device_type="cuda"):
            gen = torch.Generator().manual_seed(seed)
            layer = NobleLinear(shape.in_features, shape.out_features, bias=shape.bias, rank=shape.rank,
                                activation=FUSED_ACTIVATION, kernel="torch", device=device, dtype=param_dtype)
            _init_for_check(layer, gen)
            x = torch.randn(tokens, shape.in_features, generator=gen, dtype=torch.float64)
            g = torch.randn(tokens, shape.out_features, generator=gen, dtype=torch.float64)
            reference = copy.deepcopy(layer).to(torch.float64)
            want = _run_layer(reference, x.to(device), g.to(device), None)
            x, g = x.to(device, param_dtype), g.to(device)
            torch_path = _run_layer(layer, x, g, autocast_dtype)
            fused = copy.deepcopy(layer)
            fused.kernel = "triton"
            if not runs_fused("triton", FUSED_ACTIVATION, x):
                raise RuntimeError(f"the fused path cannot take a {device.type} tensor here")
            calls = _count_calls(nk)
            with calls:
                got = _run_layer(fused, x, g, autocast_dtype)
            if not calls.count:
                raise RuntimeError("the layer did not call the fused kernels")
        floor = max(4 * torch.finfo(compute).eps, 2e-5)
        for name, ref in want.items():
            err = _rel_err(got.get(name), ref, name)
            tol = max(floor, 4 * _rel_err(torch_path[name], ref, name))
            result.errors[name], result.tolerance[name] = err, tol
            if err > tol:
                raise RuntimeError(f"{name} differs from the reference by {err:.2e} (relative to its largest "
                                   f"value; the torch path's bound here is {tol:.2e})")
        result.ok = True
    except Exception as e:  # the whole point: any failure of the fused path becomes a verdict, not a crash
        result.error = f"{type(e).__name__}: {_first_line(e)}" if _first_line(e) else type(e).__name__
    result.seconds = time.perf_counter() - t0
    return result


class _count_calls:
    """Counts calls of `noble_kernels.cosnet_linear` inside the block (proves the layer took the fused path)."""

    def __init__(self, nk):
        self.nk, self.count = nk, 0

    def __enter__(self):
        real = self.real = self.nk.cosnet_linear

        def counting(*args, **kwargs):
            self.count += 1
            return real(*args, **kwargs)

        self.nk.cosnet_linear = counting
        return self

    def __exit__(self, *exc):
        self.nk.cosnet_linear = self.real
        return False


def self_check(shapes, device: torch.device | str, precision: str = "32-true",
               tokens: int | None = None) -> Verdict:
    """`check_shape` for each shape, cached per process (device, shape, precision, kernel switches); stops at the
    first failure, since one failure sends every layer to the torch path anyway (see kernel_check.py)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tokens = tokens or (CHECK_TOKENS if device.type == "cuda" else INTERPRETER_TOKENS)
    t0 = time.perf_counter()
    checks = []
    for shape in shapes:
        key = (str(device), shape, str(precision), tokens, _options_key())
        if key not in _CACHE:
            _CACHE[key] = check_shape(shape, device, precision, tokens)
        checks.append(_CACHE[key])
        if not checks[-1].ok:
            break
    return Verdict(ok=all(c.ok for c in checks), checks=checks, seconds=time.perf_counter() - t0)

"""The suite's kernel micro-timings: each fused kernel against what cuBLAS does for the same product, and the
whole fused layer (forward + backward) under each design switch of `noble_kernels.options`, side by side.

Kernel-level items call noble_kernels' internal launchers (`fused_linear.dual_gemm`, `.weight_grads`,
`cosnet.down_cosnet_forward`, `.cosnet_backward`); where an internal signature has moved on, that item records an
error and the others run. The design-switch items use only the public `cosnet_linear` and `options`.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from noble_cli.bench.common import error_text, kernel_ms, kernel_options
from noble_cli.bench.correctness import Shape
from noble_cli.layers.implementation import import_noble_kernels


@dataclasses.dataclass
class Micro:
    """One timed call: `flops` and `bytes` (its HBM traffic if every operand is streamed once) give TFLOP/s and
    GB/s; `options` are noble_kernels options it runs under."""

    label: str
    op: str
    impl: str
    fn: Callable[[], object]
    flops: float
    bytes: float
    options: dict = dataclasses.field(default_factory=dict)


def _tensors(s: Shape, dev: torch.device, dtype=torch.bfloat16, seed: int = 0) -> dict:
    gen = torch.Generator(device=dev).manual_seed(seed)

    def rnd(*shape, std=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * std).to(dt)

    m, k, n, r = s.m, s.k, s.n, s.r
    t = {"x": rnd(m, k), "w": rnd(n, k, std=k ** -0.5), "wd": rnd(r, k, std=k ** -0.5),
         "wu": rnd(n, r, std=r ** -0.5), "g": rnd(m, n), "c": rnd(m, r), "dh": rnd(m, r),
         "h": rnd(m, r, dt=torch.float32)}
    for name in ("bd", "f1", "p1", "mb", "f2", "p2"):
        t[name] = rnd(r, dt=torch.float32)
    t["mix"] = rnd(r, r, std=r ** -0.5, dt=torch.float32)
    return t


def _internal(module: str):
    return importlib.import_module(f"noble_kernels.{module}")


def kernel_items(s: Shape, dev: torch.device) -> Iterator[Micro]:
    """cuBLAS and the fused kernels, product by product, at one shape (bf16)."""
    t = _tensors(s, dev)
    m, k, n, r = s.m, s.k, s.n, s.r
    e = 2  # bytes per bf16 element
    x, w, wd, wu, g, c, dh = (t[i] for i in ("x", "w", "wd", "wu", "g", "c", "dh"))
    xc, wc = torch.cat([x, c], 1), torch.cat([w, wu], 1)  # [x, c] and [W, W_up]: the dual GEMM's one operand each
    gdh, wwd = torch.cat([g, dh], 1), torch.cat([w, wd], 0)
    fwd_bytes = e * (m * k + n * k + m * n)
    yield Micro("fwd y = x W^T", "fwd", "cublas", lambda: torch.mm(x, w.t()), 2 * m * k * n, fwd_bytes)
    yield Micro("fwd y = [x, c] [W, W_up]^T (K + r)", "fwd+r", "cublas", lambda: torch.mm(xc, wc.t()),
                2 * m * (k + r) * n, fwd_bytes + e * (m * r + n * r))
    yield Micro("dX = g W", "dx", "cublas", lambda: torch.mm(g, w), 2 * m * n * k, fwd_bytes)
    yield Micro("dX = [g, dh] [W; W_down] (K + r)", "dx+r", "cublas", lambda: torch.mm(gdh, wwd),
                2 * m * (n + r) * k, fwd_bytes + e * (m * r + r * k))
    yield Micro("dW = g^T x", "dw", "cublas", lambda: torch.mm(g.t(), x), 2 * m * n * k, fwd_bytes)
    dw_flops = 2 * m * (n * k + n * r + r * k)
    dw_bytes = e * (2 * m * (k + n) + m * 2 * r + n * k + n * r + r * k)
    yield Micro("dW, dW_up, dW_down: three GEMMs", "dw+r", "cublas",
                lambda: (torch.mm(g.t(), x), torch.mm(g.t(), c), torch.mm(dh.t(), x)), dw_flops, dw_bytes)

    fl = _internal("fused_linear")
    one_loop = "one_loop" in inspect.signature(fl.dual_gemm).parameters
    for variant in (("two_loops", "one_loop") if one_loop else ("two_loops",)):
        kw = {"one_loop": True} if variant == "one_loop" else {}
        yield Micro(f"fwd [x, c] [W, W_up]^T, triton {variant}", "fwd+r", "triton",
                    lambda kw=kw: fl.dual_gemm(x, w.t(), c, wu.t(), None, x.dtype, **kw), 2 * m * (k + r) * n,
                    fwd_bytes + e * (m * r + n * r), {"dual_gemm": variant})
        yield Micro(f"dX [g, dh] [W; W_down], triton {variant}", "dx+r", "triton",
                    lambda kw=kw: fl.dual_gemm(g, w, dh, wd, None, x.dtype, **kw), 2 * m * (n + r) * k,
                    fwd_bytes + e * (m * r + r * k), {"dual_gemm": variant})
    # the main GEMM alone in the same kernel (no branch K steps): how much the r extra steps cost
    yield Micro("fwd x W^T, triton (r = 0)", "fwd", "triton",
                lambda: fl.dual_gemm(x, w.t(), c[:, :0], wu.t()[:0], None, x.dtype), 2 * m * k * n, fwd_bytes)
    params = inspect.signature(fl.weight_grads).parameters
    if "dtypes" in params:
        dts = (x.dtype, x.dtype, x.dtype)
        yield Micro("dW, dW_up, dW_down: triton, one launch", "dw+r", "triton",
                    lambda: fl.weight_grads(g, dh, x, c, dts, False), dw_flops, dw_bytes, {"dw": "fused"})
        if "splitk" in params:
            yield Micro("dW, dW_up, dW_down: triton split-K (partials, before their sum)", "dw+r", "triton",
                        lambda: fl.weight_grads(g, dh, x, c, dts, False, splitk=True), dw_flops, dw_bytes,
                        {"dw": "splitk"})
    else:
        yield Micro("dW, dW_up, dW_down: triton, one launch", "dw+r", "triton",
                    lambda: fl.weight_grads(g, dh, x, c, x.dtype, x.dtype, x.dtype), dw_flops, dw_bytes)

    cn = _internal("cosnet")
    chain = (t["bd"], t["f1"], t["p1"], t["mix"], t["mb"], t["f2"], t["p2"])
    # r-wide chain kernels: memory-bound, so GB/s against HBM bandwidth is their figure
    fwd_chain_bytes = e * m * k + e * r * k + 4 * m * r + e * m * r
    yield Micro("chain forward: h = x W_down^T + b, c = CosNet(h)", "chain_fwd", "triton",
                lambda: cn.down_cosnet_forward(x, wd, *chain), 2 * m * k * r + 2 * m * r * r, fwd_chain_bytes)
    yield Micro("chain forward in torch ops", "chain_fwd", "torch",
                lambda: torch.cos(t["f2"] * F.linear(torch.cos(t["f1"] * (F.linear(x, wd).float() + t["bd"])
                                                               + t["p1"]), t["mix"], t["mb"]) + t["p2"]).to(x.dtype),
                2 * m * k * r + 2 * m * r * r, fwd_chain_bytes)
    bwd_chain_bytes = e * m * n + e * n * r + 4 * m * r + e * m * r
    yield Micro("chain backward: dh and CosNet gradients from g W_up", "chain_bwd", "triton",
                lambda: cn.cosnet_backward(g, wu, t["h"], t["f1"], t["p1"], t["mix"], t["mb"], t["f2"], t["p2"]),
                2 * m * n * r + 4 * m * r * r, bwd_chain_bytes)


def layer_items(s: Shape, dev: torch.device, switches: int | None = None) -> Iterator[Micro]:
    """The whole layer, forward + backward (bf16 autocast, fp32 master weights as in training): cuBLAS linear,
    NobleLinear's torch path, and the fused op under its defaults and each design switch alone."""
    from noble_cli.layers import NobleLinear

    nk = import_noble_kernels()
    torch.manual_seed(0)
    base = torch.nn.Linear(s.k, s.n, bias=s.bias, device=dev)
    noble = NobleLinear(s.k, s.n, bias=s.bias, rank=s.r, kernel="torch", device=dev)
    x = torch.randn(s.m, s.k, device=dev, requires_grad=True)
    gy = torch.randn(s.m, s.n, device=dev, dtype=torch.bfloat16)
    flops = 6 * s.m * (s.k * s.n + s.r * (s.k + s.r + s.n))
    e = 2
    nbytes = e * 3 * s.m * (s.k + s.n)  # a plain linear's three GEMMs, each streaming its T-sized operands once

    def fwd_bwd(mod):
        def run():
            x.grad = None
            for p in mod.parameters():
                p.grad = None
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                y = mod(x)
            y.backward(gy)
        return run

    yield Micro("layer fwd+bwd: nn.Linear (cuBLAS)", "layer", "cublas", fwd_bwd(base), 6 * s.m * s.k * s.n, nbytes)
    yield Micro("layer fwd+bwd: NobleLinear torch path", "layer", "torch", fwd_bwd(noble), flops, nbytes)
    fused = NobleLinear(s.k, s.n, bias=s.bias, rank=s.r, kernel="triton", device=dev)
    fused.load_state_dict(noble.state_dict())
    options_list = [{}]
    choices, defaults = nk.KernelOptions.choices(), dataclasses.asdict(nk.KernelOptions())
    for field, values in choices.items():
        options_list += [{field: v} for v in values if v != defaults.get(field)]
    for opts in options_list[: None if switches is None else 1 + switches]:
        label = ", ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        yield Micro(f"layer fwd+bwd: fused, {label}", "layer", "triton", fwd_bwd(fused), flops, nbytes, opts)


def run_micro(micro: Micro, dev: torch.device, s: Shape) -> dict:
    rec = {"phase": "micro", "item": f"{s.name} {micro.label}", "shape": s.name, "m": s.m, "k": s.k, "n": s.n,
           "r": s.r, "op": micro.op, "impl": micro.impl, "options": micro.options, "flops": micro.flops,
           "bytes": micro.bytes}
    try:
        with kernel_options(**micro.options):
            ms = kernel_ms(micro.fn, dev)
        rec.update(status="ok", ms=ms, tflops=micro.flops / ms / 1e9, gbps=micro.bytes / ms / 1e6)
    except Exception as e:
        rec.update(status="error", error=error_text(e))
    return rec


def micro_plan(shapes, dev: torch.device, switches: int | None = None
               ) -> Iterator[tuple[Shape, Callable[[], Iterator[Micro]]]]:
    """(shape, item generator) per shape: the layer-level switches first (public API), then the kernels.
    `switches`: how many design switches to time (None: all)."""
    for s in shapes:
        yield s, (lambda s=s: layer_items(s, dev, switches))
    for s in shapes:
        yield s, (lambda s=s: kernel_items(s, dev))


def safe_items(gen: Callable[[], Iterator[Micro]], s: Shape) -> Iterator[Micro | dict]:
    """The generator's items; an internal API that has moved on ends it with an error record, not a crash."""
    try:
        yield from gen()
    except Exception as e:
        yield {"phase": "micro", "item": f"{s.name} (setting up the items)", "shape": s.name, "status": "error",
               "error": error_text(e)}


__all__ = ["Micro", "kernel_items", "layer_items", "micro_plan", "run_micro", "safe_items"]

"""`cosnet_linear`: the differentiable entry point, registered as torch custom ops so torch.compile keeps the
Triton kernels as opaque calls (no graph break, no attempt to trace into them).

    y = x W^T + b + W_up cos(freq2 * (M cos(freq1 * (W_down x + b_down) + phase1) + b_mix) + phase2)

Forward  = `down_cosnet_forward` (x -> h, c; r-wide) + `dual_gemm` ([x, c] @ [W, W_up]^T + b).
Backward = `cosnet_backward` (g -> dh and the CosNet parameter gradients; r-wide)
         + `dual_gemm` ([g, dh] @ [W; W_down] = dX)
         + `weight_grads` ([g, dh]^T [x, c] = dW, dW_up, dW_down; plus db, db_down).
Saved for backward: the inputs (no copies) and two r-wide tensors, h (fp32) and c.

Mixed precision: the Triton kernels do not see autocast, so the public wrapper applies it itself, the way autocast
treats F.linear: the four matrices (x, W, W_down, W_up) are cast to the autocast dtype (these casts are ordinary
autograd ops, so fp32 master weights receive fp32 gradients), while the per-channel vectors (biases, frequencies,
phases) and the r x r mix matrix stay in their own dtype and are used in fp32 inside the kernels. Without autocast,
the compute dtype is x's dtype.

Design switches (`options.KernelOptions`: gemm, dw, dual_gemm, partials) are read when `cosnet_linear` is called
and passed to both ops as string arguments: the backward uses the options of its forward, and torch.compile
treats them as constants of the graph (a change recompiles instead of running a stale variant).
`gemm="torch"` (or NOBLE_KERNELS_GEMM=torch) keeps the fused r-wide kernels but does the full-width GEMMs with
cuBLAS (addmm into y / dX, separate weight-gradient GEMMs): a comparison point for `noble bench`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .options import KernelOptions, current_options

_NS = "noble_kernels"
GEMM_BACKENDS = KernelOptions.choices()["gemm"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------------------------
# Forward op: returns y and the two r-wide tensors the backward needs.

@torch.library.custom_op(f"{_NS}::cosnet_linear_fwd", mutates_args=())
def _fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
    freq1: torch.Tensor, phase1: torch.Tensor, mix_weight: torch.Tensor, mix_bias: Optional[torch.Tensor],
    freq2: torch.Tensor, phase2: torch.Tensor, up_weight: torch.Tensor,
    gemm: str, dw: str, dual_gemm: str, partials: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import cosnet, fused_linear  # triton is imported here, at first use

    # dw and partials are the backward's: taken here so that it uses the options of its forward
    m, n, r = x.shape[0], weight.shape[0], up_weight.shape[1]
    if m == 0:
        return (x.new_zeros((0, n)), x.new_zeros((0, r), dtype=torch.float32), x.new_zeros((0, r)))
    with _no_autocast(x.device), _device_guard(x):
        h, c = cosnet.down_cosnet_forward(x, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias,
                                          freq2, phase2)
        if gemm == "torch":
            y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias.to(x.dtype), x, weight.t())
            y.addmm_(c, up_weight.t())
        else:
            y = fused_linear.dual_gemm(x, weight.t(), c, up_weight.t(), bias, x.dtype, dual_gemm == "one_loop")
    return y, h, c


@_fwd.register_fake
def _fwd_fake(x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2,
              up_weight, gemm, dw, dual_gemm, partials):
    m, n, r = x.shape[0], weight.shape[0], up_weight.shape[1]
    return x.new_empty((m, n)), x.new_empty((m, r), dtype=torch.float32), x.new_empty((m, r))


# --------------------------------------------------------------------------------------------------------------
# Backward op: all twelve gradients (vector and mix gradients in fp32; the wrapper casts them to the inputs' dtypes).

@torch.library.custom_op(f"{_NS}::cosnet_linear_bwd", mutates_args=())
def _bwd(
    g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, down_weight: torch.Tensor,
    freq1: torch.Tensor, phase1: torch.Tensor, mix_weight: torch.Tensor, mix_bias: Optional[torch.Tensor],
    freq2: torch.Tensor, phase2: torch.Tensor, up_weight: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
    has_bias: bool, gemm: str, dw: str, dual_gemm: str, partials: str,
) -> list[torch.Tensor]:
    from . import cosnet, fused_linear
    from . import partials as partial_sums

    m, k = x.shape
    n, r = weight.shape[0], up_weight.shape[1]
    if m == 0:
        return _no_token_grads(x, weight, down_weight, up_weight)
    w_dtypes = (weight.dtype, up_weight.dtype, down_weight.dtype)
    with _no_autocast(x.device), _device_guard(x):
        g = g.to(x.dtype)
        dh, vec_part, mat_part = cosnet.cosnet_backward(g, up_weight, h, freq1, phase1, mix_weight, mix_bias,
                                                        freq2, phase2)
        if gemm == "torch":
            dx = torch.mm(g, weight)
            dx.addmm_(dh, down_weight)
        else:
            dx = fused_linear.dual_gemm(g, weight, dh, down_weight, None, x.dtype, dual_gemm == "one_loop")
        if gemm == "torch" or dw == "cublas":
            splits, wgrads = 1, (torch.mm(g.t(), x), torch.mm(g.t(), c), torch.mm(dh.t(), x),
                                 g.sum(0, dtype=torch.float32) if has_bias else None)
        else:
            splits, wgrads = fused_linear.weight_grads(g, dh, x, c, w_dtypes, has_bias, dw == "splitk")
        vectors, dmix, (dweight, dwu, dwd, db) = partial_sums.finish(vec_part, mat_part, r, splits, wgrads,
                                                                     w_dtypes, partials)
    vec = dict(zip(partial_sums.VEC_ROWS, vectors))
    if db is None:  # no bias: a placeholder the autograd glue drops (the op's outputs are all tensors)
        db = x.new_zeros((n,), dtype=torch.float32)
    return [dx, dweight, db, dwd, vec["down_bias"], vec["freq1"], vec["phase1"], dmix, vec["mix_bias"], vec["freq2"],
            vec["phase2"], dwu]


def _no_token_grads(x, weight, down_weight, up_weight) -> list[torch.Tensor]:
    """All twelve gradients for 0 tokens: zeros. new_zeros(shape), not zeros_like: gradients are contiguous
    whatever the weights' strides."""
    k, (n, r), f32 = x.shape[1], up_weight.shape, torch.float32
    return [x.new_zeros((0, k)), weight.new_zeros(weight.shape), x.new_zeros((n,), dtype=f32),
            down_weight.new_zeros(down_weight.shape), x.new_zeros((r,), dtype=f32),
            *[x.new_zeros((r,), dtype=f32) for _ in range(2)], x.new_zeros((r, r), dtype=f32),
            *[x.new_zeros((r,), dtype=f32) for _ in range(3)], up_weight.new_zeros(up_weight.shape)]


@_bwd.register_fake
def _bwd_fake(g, x, weight, down_weight, freq1, phase1, mix_weight, mix_bias, freq2, phase2, up_weight, h, c,
              has_bias, gemm, dw, dual_gemm, partials):
    r = up_weight.shape[1]
    f32 = torch.float32
    vec = [x.new_empty((r,), dtype=f32) for _ in range(5)]
    # new_empty(shape), not empty_like: the real op returns contiguous gradients whatever the weights' strides
    return [x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty((weight.shape[0],), dtype=f32),
            down_weight.new_empty(down_weight.shape), vec[0], vec[1], vec[2], x.new_empty((r, r), dtype=f32),
            vec[3], vec[4], x.new_empty((r,), dtype=f32), up_weight.new_empty(up_weight.shape)]


# --------------------------------------------------------------------------------------------------------------
# Autograd glue.

_INPUTS = ("x", "weight", "bias", "down_weight", "down_bias", "freq1", "phase1", "mix_weight", "mix_bias",
           "freq2", "phase2", "up_weight")


def _setup_context(ctx, inputs, output):
    (x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2, up_weight,
     *opts) = inputs
    _, h, c = output
    ctx.save_for_backward(x, weight, down_weight, freq1, phase1, mix_weight, mix_bias, freq2, phase2,
                          up_weight, h, c)
    ctx.opts = opts
    ctx.has_bias = bias is not None
    ctx.has_down_bias = down_bias is not None
    ctx.has_mix_bias = mix_bias is not None
    ctx.dtypes = [None if t is None else t.dtype for t in inputs[:12]]
    ctx.mark_non_differentiable(h, c)


def _backward(ctx, gy, _gh, _gc):
    (x, weight, down_weight, freq1, phase1, mix_weight, mix_bias, freq2, phase2, up_weight, h, c) = ctx.saved_tensors
    grads = torch.ops.noble_kernels.cosnet_linear_bwd(
        gy.contiguous(), x, weight, down_weight, freq1, phase1, mix_weight, mix_bias, freq2, phase2, up_weight,
        h, c, ctx.has_bias, *ctx.opts)
    out = [gr.to(dt) if dt is not None else None for gr, dt in zip(grads, ctx.dtypes)]
    if not ctx.has_bias:
        out[2] = None
    if not ctx.has_down_bias:
        out[4] = None
    if not ctx.has_mix_bias:
        out[8] = None
    return (*out, *(None for _ in ctx.opts))  # no gradients for the option strings


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _device_guard(x: torch.Tensor):
    import contextlib

    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Public function.

_INT32_LIMIT = 2**31  # the kernels' offsets are int32


def _check_shapes(x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2,
                  up_weight) -> None:
    """What F.linear would refuse, refused here too: the kernels would read out of bounds instead."""
    if weight.ndim != 2 or down_weight.ndim != 2 or up_weight.ndim != 2 or mix_weight.ndim != 2:
        raise ValueError("cosnet_linear: weight, down_weight, mix_weight and up_weight must be matrices")
    n, k = weight.shape
    r = down_weight.shape[0]
    expected = {"x": (x.shape[-1:] if x.ndim else (), (k,)), "down_weight": (down_weight.shape, (r, k)),
                "mix_weight": (mix_weight.shape, (r, r)), "up_weight": (up_weight.shape, (n, r)),
                "bias": (None if bias is None else bias.shape, (n,))}
    for name, t in (("down_bias", down_bias), ("freq1", freq1), ("phase1", phase1), ("mix_bias", mix_bias),
                    ("freq2", freq2), ("phase2", phase2)):
        expected[name] = (None if t is None else t.shape, (r,))
    for name, (got, want) in expected.items():
        if got is not None and tuple(got) != want:
            where = "last dimension of x" if name == "x" else name
            raise ValueError(f"cosnet_linear: {where} has shape {tuple(got)}, expected {want} "
                             f"(weight {n}x{k}, rank {r})")
    tokens = x.numel() // max(1, k)
    # the largest offset a kernel forms: the output/gradient extents, and x's own extent through its strides
    x_extent = sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride())) + 1 if x.numel() else 0
    if max(tokens * max(k, n), weight.numel(), x_extent) >= _INT32_LIMIT:
        raise ValueError(f"cosnet_linear: {tokens} tokens x max(in, out) = {tokens * max(k, n)} elements (x spans "
                         f"{x_extent}) reach the kernels' int32 offset limit (2^31); split the batch")


def cosnet_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    down_weight: torch.Tensor, down_bias: Optional[torch.Tensor],
    freq1: torch.Tensor, phase1: torch.Tensor, mix_weight: torch.Tensor, mix_bias: Optional[torch.Tensor],
    freq2: torch.Tensor, phase2: torch.Tensor, up_weight: torch.Tensor, *, gemm: Optional[str] = None,
) -> torch.Tensor:
    """A NOBLE CosNet linear layer, fused. x: (..., in); weight: (out, in); down_weight: (r, in);
    mix_weight: (r, r); up_weight: (out, r); bias (out,), down_bias, freq*, phase*, mix_bias (r,); biases may be
    None. Returns (..., out) in the compute dtype (the autocast dtype under autocast, else x's dtype).
    Kernel variants: `current_options()` (see `options()`); `gemm` overrides its gemm field."""
    opts = current_options()
    if gemm is not None:
        opts = dataclasses.replace(opts, gemm=gemm)
    _check_shapes(x, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2,
                  up_weight)
    # The kernels index per-channel vectors as ptr + i: give them unit stride (a no-op for parameters).
    bias, down_bias, freq1, phase1, mix_bias, freq2, phase2 = (
        None if t is None else t.contiguous() for t in (bias, down_bias, freq1, phase1, mix_bias, freq2, phase2))
    dt = _compute_dtype(x)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.dtype != dt:
        x2 = x2.to(dt)
    weight, down_weight, up_weight = (t if t.dtype == dt else t.to(dt) for t in (weight, down_weight, up_weight))
    y, _, _ = torch.ops.noble_kernels.cosnet_linear_fwd(
        x2, weight, bias, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2, up_weight,
        *opts.as_args())
    return y.reshape(*lead, weight.shape[0])

"""Sums of per-block partial gradients: the CosNet backward's rows (one per block of tokens) and, with split-K, the
weight-gradient kernel's fp32 partials (one per token range). Summed in a fixed order either way: deterministic.

Option `partials`: "host" = torch reductions plus the slicing/cloning/casting around them (2 launches and 6
clones for the CosNet rows, 4 reductions and 3 casts more with split-K); "finalize" = `_finalize_kernel`, one
launch that reads every partial once and writes each final gradient in its own dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common, tuning

# The CosNet backward's vector rows: gradients of these parameters.
VEC_ROWS = ("freq1", "phase1", "mix_bias", "freq2", "phase2", "down_bias")


@triton.jit
def _sum_parts(in_ptr, n_parts, part_stride, in_off, out_ptrs, mask,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[c] = sum over parts p of in[p * part_stride + in_off[c]], in chunks of BLOCK_P parts (fixed order)."""
    offs_p = tl.arange(0, BLOCK_P)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + offs_p
        acc += tl.load(in_ptr + p[:, None] * part_stride + in_off[None, :],
                       mask=(p[:, None] < n_parts) & mask[None, :], other=0.0)
    tl.store(out_ptrs, tl.sum(acc, axis=0).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _finalize_kernel(
    vec_ptr, mat_ptr, o_f1, o_p1, o_mb, o_f2, o_p2, o_bd, o_mix,
    ws_dw, ws_dwu, ws_dwd, ws_db, o_dw, o_dwu, o_dwd, o_db,
    P, S, N, K, R, BR,
    HAS_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Programs, in order: BLOCK_C-wide blocks of the vector gradients (6 x R, row-major over VEC_ROWS), of the mix
    # gradient (R x R), and with split-K of dW (N x K), dW_up (N x R), dW_down (R x K), db (N). The CosNet rows are
    # BR-padded: (P, 6, BR) and (P, BR, BR); the split-K partials are (S, ...) contiguous.
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK_C)
    nb_vec = tl.cdiv(6 * R, BLOCK_C)
    nb_mix = tl.cdiv(R * R, BLOCK_C)
    if pid < nb_vec:
        flat = pid * BLOCK_C + offs
        row = flat // R
        col = flat % R
        out = tl.where(row == 0, o_f1, tl.where(row == 1, o_p1, tl.where(row == 2, o_mb, tl.where(
            row == 3, o_f2, tl.where(row == 4, o_p2, o_bd))))) + col
        _sum_parts(vec_ptr, P, 6 * BR, row * BR + col, out, flat < 6 * R, BLOCK_P, BLOCK_C)
    elif pid < nb_vec + nb_mix:
        flat = (pid - nb_vec) * BLOCK_C + offs
        _sum_parts(mat_ptr, P, BR * BR, (flat // R) * BR + flat % R, o_mix + flat, flat < R * R, BLOCK_P, BLOCK_C)
    elif HAS_SPLIT:
        q = pid - nb_vec - nb_mix
        nb_dw = tl.cdiv(N * K, BLOCK_C)
        nb_dwu = tl.cdiv(N * R, BLOCK_C)
        nb_dwd = tl.cdiv(R * K, BLOCK_C)
        if q < nb_dw:
            flat = q * BLOCK_C + offs
            _sum_parts(ws_dw, S, N * K, flat, o_dw + flat, flat < N * K, BLOCK_S, BLOCK_C)
        elif q < nb_dw + nb_dwu:
            flat = (q - nb_dw) * BLOCK_C + offs
            _sum_parts(ws_dwu, S, N * R, flat, o_dwu + flat, flat < N * R, BLOCK_S, BLOCK_C)
        elif q < nb_dw + nb_dwu + nb_dwd:
            flat = (q - nb_dw - nb_dwu) * BLOCK_C + offs
            _sum_parts(ws_dwd, S, R * K, flat, o_dwd + flat, flat < R * K, BLOCK_S, BLOCK_C)
        elif HAS_BIAS:
            flat = (q - nb_dw - nb_dwu - nb_dwd) * BLOCK_C + offs
            _sum_parts(ws_db, S, N, flat, o_db + flat, flat < N, BLOCK_S, BLOCK_C)


def finish(vec_part, mat_part, r: int, splits: int, wgrads: tuple, w_dtypes: tuple, mode: str):
    """Final gradients from the partials. vec_part (P, 6, BR), mat_part (P, BR, BR): the CosNet backward's rows;
    wgrads = (dW, dW_up, dW_down, db or None): final if splits == 1, else their (splits, ...) fp32 partials, summed
    and cast to `w_dtypes` (three dtypes). Returns (six (r,) fp32 vectors in VEC_ROWS order, the (r, r) fp32 mix
    gradient, (dW, dW_up, dW_down, db)); all separate tensors (a custom op's outputs may not alias)."""
    if mode == "finalize":
        return _finalize(vec_part, mat_part, r, splits, wgrads, w_dtypes)
    vec = vec_part.sum(0)
    vectors = [vec[i, :r].clone() for i in range(len(VEC_ROWS))]
    dmix = mat_part.sum(0)[:r, :r].contiguous()
    if splits > 1:
        dw, dwu, dwd, db = wgrads
        wgrads = (*(p.sum(0).to(dt) for p, dt in zip((dw, dwu, dwd), w_dtypes)), None if db is None else db.sum(0))
    return vectors, dmix, wgrads


def _finalize(vec_part, mat_part, r, splits, wgrads, w_dtypes):
    nparts, _, br = vec_part.shape
    dev = vec_part.device
    vectors = [_common.empty((r,), torch.float32, dev) for _ in VEC_ROWS]
    dmix = _common.empty((r, r), torch.float32, dev)
    ws_dw, ws_dwu, ws_dwd, ws_db = wgrads
    has_split, has_bias = splits > 1, ws_db is not None
    if has_split:
        n, k = ws_dw.shape[1:]
        out = [_common.empty(p.shape[1:], dt, dev) for p, dt in zip((ws_dw, ws_dwu, ws_dwd), w_dtypes)]
        out.append(_common.empty((n,), torch.float32, dev) if has_bias else None)
    else:  # the weight gradients are final already; their slots get placeholders the kernel never touches
        n, k = 1, 1
        ws_dw = ws_dwu = ws_dwd = ws_db = vec_part
        out = list(wgrads)
    args = (vec_part, mat_part, *vectors, dmix,
            ws_dw, ws_dwu, ws_dwd, ws_db if has_bias else ws_dw,
            *(o if has_split else dmix for o in out[:3]), out[3] if has_split and has_bias else dmix,
            nparts, splits, n, k, r, br)
    kwargs = dict(HAS_SPLIT=has_split, HAS_BIAS=has_bias, BLOCK_S=_common.next_pow2(splits))

    def grid(meta):
        sizes = [6 * r, r * r] + ([n * k, n * r, r * k] + ([n] if has_bias else []) if has_split else [])
        return (sum(triton.cdiv(s, meta["BLOCK_C"]) for s in sizes),)

    meta = tuning.plan("finalize", 4, dev)
    tuning.launch("finalize", _finalize_kernel, ["P", "S", "N", "K", "R"], grid, meta, 4, args, kwargs)
    return vectors, dmix, tuple(out)

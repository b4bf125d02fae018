"""The r-wide half of the layer: the down-projection with the CosNet chain, and its backward, fused.

Forward, one kernel (`_down_cosnet_fwd_kernel`), per block of BLOCK_M tokens:

    h  = x W_down^T + b_down                  (skinny GEMM: the only full-width read is the x row block)
    c1 = cos(freq1 * h + phase1)
    z  = c1 M^T + b_mix                       (r x r, in registers)
    c  = cos(freq2 * z + phase2)

It writes h (fp32) for the backward and c (compute dtype) for the main GEMM. Nothing full-width is written and the
chain's intermediates (c1, z, the cos arguments) never leave registers: the backward recomputes them from h.

Backward, one kernel (`_cosnet_bwd_kernel`), per block of tokens:

    dc  = g W_up                              (skinny GEMM over the output gradient g, the only full-width read)
    da2 = -dc sin(a2);   dfreq2 += sum(da2 z), dphase2 += sum(da2)
    dz  = da2 freq2;     dM += dz^T c1,        db_mix += sum(dz)
    dc1 = dz M
    da1 = -dc1 sin(a1);  dfreq1 += sum(da1 h), dphase1 += sum(da1)
    dh  = da1 freq1                           (written: the dX and dW_down GEMMs read it)
    db_down = sum(dh) = freq1 * dphase1       (no extra sum; from fp32 da1, not from dh rounded to bf16)

Each program (one block of tokens) writes its partial parameter-gradient sums as one row (6 vectors and an r x r
matrix); `partials.finish` sums the rows (tokens/64 of them: 4 MB at 16k tokens, r=64). Deterministic, no atomics.
A persistent grid that kept the sums in registers across blocks would write less, but holding them live across
the g loop made the kernel spill (see aot_check).

Padding: the bottleneck is padded to BLOCK_R = max(16, next_pow2(r)) lanes. Padded lanes of W_down, W_up, M and
the vectors load as 0, so padded lanes of h, dc, dz, dc1 are exactly 0 and contribute nothing; padded c1 lanes are
cos(0) = 1 but only meet zero columns of M. Rows past the last token load g = 0, so all their gradients vanish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common, partials, tuning


@triton.jit
def _down_cosnet_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, f1_ptr, p1_ptr, mw_ptr, mb_ptr, f2_ptr, p2_ptr, h_ptr, c_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_wr, stride_wk, stride_mo, stride_mi, stride_hm, stride_cm,
    HAS_BD: tl.constexpr, HAS_MB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    CHAIN_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    # h = x W_down^T: the x row block is streamed once; W_down (r x K) is small and stays in L2.
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xa = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(wd_ptr + offs_k[:, None] * stride_wk + offs_r[None, :] * stride_wr,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_F32:  # interpreter only (see _common.dot_f32)
            xa = xa.to(tl.float32)
            wt = wt.to(tl.float32)
        acc += tl.dot(xa, wt, input_precision=PRECISION)
    h = acc
    if HAS_BD:
        h += tl.load(bd_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]

    # The chain, in fp32 registers. M^T is loaded as (in, out) so that z = c1 @ M^T is a plain tl.dot.
    f1 = tl.load(f1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    p1 = tl.load(p1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    f2 = tl.load(f2_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    p2 = tl.load(p2_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    m_t = tl.load(mw_ptr + offs_r[:, None] * stride_mi + offs_r[None, :] * stride_mo,
                  mask=mask_r[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    c1 = tl.cos(h * f1[None, :] + p1[None, :])
    z = tl.dot(c1, m_t, input_precision=CHAIN_PRECISION)
    if HAS_MB:
        z += tl.load(mb_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    c = tl.cos(z * f2[None, :] + p2[None, :])

    mask = mask_m[:, None] & mask_r[None, :]
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :], h, mask=mask)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_r[None, :], c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cosnet_bwd_kernel(
    g_ptr, wu_ptr, h_ptr, f1_ptr, p1_ptr, mw_ptr, mb_ptr, f2_ptr, p2_ptr, dh_ptr, vec_part_ptr, mat_part_ptr,
    M, N, R,
    stride_gm, stride_gn, stride_wun, stride_wur, stride_mo, stride_mi, stride_hm, stride_dhm,
    HAS_MB: tl.constexpr, VEC_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    CHAIN_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R

    f1 = tl.load(f1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    p1 = tl.load(p1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    f2 = tl.load(f2_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    p2 = tl.load(p2_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    mb = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if HAS_MB:
        mb = tl.load(mb_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    mask_rr = mask_r[:, None] & mask_r[None, :]

    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # dc = g W_up: the g row block is streamed once; W_up (N x r) stays in L2.
    dc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n in range(0, N, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        wu = tl.load(wu_ptr + offs_n[:, None] * stride_wun + offs_r[None, :] * stride_wur,
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if DOT_F32:  # interpreter only (see _common.dot_f32)
            g = g.to(tl.float32)
            wu = wu.to(tl.float32)
        dc += tl.dot(g, wu, input_precision=PRECISION)

    # Recompute the forward chain from h (cheaper than saving c1, z and both cos arguments). M is loaded here,
    # not once before the loop: it is L1/L2-resident, and holding it in registers across the g loop spills.
    # mm[o, i] = M[o, i] serves dc1 = dz @ M; its transpose serves z = c1 @ M^T.
    mm = tl.load(mw_ptr + offs_r[:, None] * stride_mo + offs_r[None, :] * stride_mi, mask=mask_rr, other=0.0)
    mm = mm.to(tl.float32)
    h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :],
                mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    # Written in the order that lets each (BLOCK_M x BLOCK_R) tile die early: register pressure is what
    # limits this kernel (see aot_check).
    a1 = h * f1[None, :] + p1[None, :]
    c1 = tl.cos(a1)
    s1 = tl.sin(a1)
    z = tl.dot(c1, tl.trans(mm), input_precision=CHAIN_PRECISION) + mb[None, :]
    da2 = -dc * tl.sin(z * f2[None, :] + p2[None, :])
    s_f2 = tl.sum(da2 * z, axis=0)
    s_p2 = tl.sum(da2, axis=0)
    dz = da2 * f2[None, :]
    d_m = tl.dot(tl.trans(dz), c1, input_precision=CHAIN_PRECISION)
    da1 = -tl.dot(dz, mm, input_precision=CHAIN_PRECISION) * s1
    dh = da1 * f1[None, :]
    tl.store(dh_ptr + offs_m[:, None] * stride_dhm + offs_r[None, :], dh.to(dh_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_r[None, :])

    # One partial row per token block (all BLOCK_R lanes, padded ones included, so the buffer is fully written).
    # Rows: freq1, phase1, mix_bias, freq2, phase2, down_bias (see partials.VEC_ROWS).
    vec = vec_part_ptr + pid * VEC_ROWS * BLOCK_R + offs_r
    s_p1 = tl.sum(da1, axis=0)
    tl.store(vec + 0 * BLOCK_R, tl.sum(da1 * h, axis=0))
    tl.store(vec + 1 * BLOCK_R, s_p1)
    tl.store(vec + 2 * BLOCK_R, tl.sum(dz, axis=0))
    tl.store(vec + 3 * BLOCK_R, s_f2)
    tl.store(vec + 4 * BLOCK_R, s_p2)
    tl.store(vec + 5 * BLOCK_R, s_p1 * f1)
    tl.store(mat_part_ptr + pid * BLOCK_R * BLOCK_R + offs_r[:, None] * BLOCK_R + offs_r[None, :], d_m)


def down_cosnet_forward(x2, down_weight, down_bias, freq1, phase1, mix_weight, mix_bias, freq2, phase2):
    """x2: (tokens, in). Returns h (tokens, r) fp32 and c (tokens, r) in x2's dtype."""
    m, k = x2.shape
    r = down_weight.shape[0]
    h = _common.empty((m, r), torch.float32, x2.device)
    c = _common.empty((m, r), x2.dtype, x2.device)
    args = (
        x2, down_weight, down_bias if down_bias is not None else h, freq1, phase1, mix_weight,
        mix_bias if mix_bias is not None else h, freq2, phase2, h, c,
        m, k, r,
        x2.stride(0), x2.stride(1), down_weight.stride(0), down_weight.stride(1),
        mix_weight.stride(0), mix_weight.stride(1), h.stride(0), c.stride(0),
    )
    kwargs = dict(HAS_BD=down_bias is not None, HAS_MB=mix_bias is not None, BLOCK_R=_common.rank_block(r),
                  PRECISION=_common.dot_precision(x2.dtype, x2.device),
                  CHAIN_PRECISION=_common.chain_precision(x2.dtype, x2.device), DOT_F32=_common.dot_f32(x2))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]),)

    meta = tuning.plan("down_cosnet_fwd", x2.element_size(), x2.device)
    tuning.launch("down_cosnet_fwd", _down_cosnet_fwd_kernel, ["M", "K", "R"], grid, meta, x2.element_size(), args,
                  kwargs)
    return h, c


def cosnet_backward(g2, up_weight, h, freq1, phase1, mix_weight, mix_bias, freq2, phase2):
    """g2: (tokens, out) output gradient. Returns dh (tokens, r) in g2's dtype and the fp32 per-block partial sums
    of the vector gradients, (blocks, 6, BLOCK_R) in `partials.VEC_ROWS` order, and of the mix matrix's,
    (blocks, BLOCK_R, BLOCK_R); padded lanes hold zeros."""
    m, n = g2.shape
    r = up_weight.shape[1]
    br = _common.rank_block(r)
    meta = tuning.plan("cosnet_bwd", g2.element_size(), g2.device)
    # every CUDA config has BLOCK_M = BWD_BLOCK_M: the number of partial rows is known before the autotuner picks
    progs = triton.cdiv(m, meta["BLOCK_M"] if meta is not None else tuning.BWD_BLOCK_M)
    dh = _common.empty((m, r), g2.dtype, g2.device)
    vec_part = _common.empty((progs, len(partials.VEC_ROWS), br), torch.float32, g2.device)
    mat_part = _common.empty((progs, br, br), torch.float32, g2.device)
    args = (
        g2, up_weight, h, freq1, phase1, mix_weight, mix_bias if mix_bias is not None else h, freq2, phase2,
        dh, vec_part, mat_part,
        m, n, r,
        g2.stride(0), g2.stride(1), up_weight.stride(0), up_weight.stride(1),
        mix_weight.stride(0), mix_weight.stride(1), h.stride(0), dh.stride(0),
    )
    kwargs = dict(HAS_MB=mix_bias is not None, VEC_ROWS=len(partials.VEC_ROWS), BLOCK_R=br,
                  PRECISION=_common.dot_precision(g2.dtype, g2.device),
                  CHAIN_PRECISION=_common.chain_precision(g2.dtype, g2.device), DOT_F32=_common.dot_f32(g2))
    tuning.launch("cosnet_bwd", _cosnet_bwd_kernel, ["M", "N", "R"], lambda meta: (progs,), meta,
                  g2.element_size(), args, kwargs)
    return dh, vec_part, mat_part

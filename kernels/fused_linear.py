"""The full-width half of the layer: GEMMs that fold the rank-r branch into the main GEMM's loops.

`dual_gemm`:  out = A1 @ B1 + A2 @ B2 (+ bias), one output tile per program, the K loop running over A1/B1 and
then over A2/B2. Used twice:

    forward  y  = [x, c] @ [W, W_up]^T + b        A1 = x (T x in),  B1 = W^T,   A2 = c  (T x r), B2 = W_up^T
    backward dX = [g, dh] @ [W; W_down]           A1 = g (T x out), B1 = W,     A2 = dh (T x r), B2 = W_down

so the branch's up-projection (and, in backward, the down-projection's input gradient) is r more steps of the
main GEMM's K loop: no full-width branch tensor is written, and no read-modify-write pass over y or dX. The
operands are passed with strides, so nothing is concatenated or transposed in memory.

`weight_grads`: one launch computing every weight gradient as tiles of one block matrix,

    [ dW       dW_up ]   [ g^T ]
    [ dW_down   ---- ] = [ dh^T ] @ [ x  c ]        (the dh^T c corner is not needed and not computed)

Rows of output tiles come from g (N rows) or dh (r rows), columns from x (K columns) or c (r columns); each program
reduces over tokens. Compared with dW alone, this adds one row of tiles (dh) and one column of tiles (c): the
extra tiles re-read g and x exactly as the main dW tiles do (mostly from L2), instead of a separate skinny GEMM
streaming them from memory once more. The programs of the first column tile also sum their g / dh rows over
tokens: the bias gradients db and db_down come for free from tiles already in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common


@triton.jit
def _dual_gemm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, EVEN_K1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Grouped ("swizzled") tile order: GROUP_M consecutive row tiles share the B column tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap around to valid memory instead of being masked on every load: they compute
    # garbage that the masked store drops. Only the reduction dimension needs masking (loaded as 0).
    rm = offs_m % M
    rn = offs_n % N
    offs_kb = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_ptrs = a1_ptr + rm[:, None] * stride_a1m + offs_kb[None, :] * stride_a1k
    b_ptrs = b1_ptr + offs_kb[:, None] * stride_b1k + rn[None, :] * stride_b1n
    for k in range(0, K1, BLOCK_K):
        if EVEN_K1:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_kb[None, :] < K1 - k, other=0.0)
            b = tl.load(b_ptrs, mask=offs_kb[:, None] < K1 - k, other=0.0)
        if DOT_F32:  # interpreter only (see _common.dot_f32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_a1k
        b_ptrs += BLOCK_K * stride_b1k

    # The branch: r more K steps, over the r-wide operand and its weight.
    a_ptrs = a2_ptr + rm[:, None] * stride_a2m + offs_kb[None, :] * stride_a2k
    b_ptrs = b2_ptr + offs_kb[:, None] * stride_b2k + rn[None, :] * stride_b2n
    for k in range(0, K2, BLOCK_K):
        a = tl.load(a_ptrs, mask=offs_kb[None, :] < K2 - k, other=0.0)
        b = tl.load(b_ptrs, mask=offs_kb[:, None] < K2 - k, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_a2k
        b_ptrs += BLOCK_K * stride_b2k

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tn_tile(
    a_ptr, b_ptr, o_ptr, bias_ptr, row0, col0, T, n_rows, n_cols,
    stride_at, stride_ar, stride_bt, stride_bc, stride_or, stride_oc, do_bias,
    EVEN_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) tile of A^T B, reducing over T tokens; A is (T, n_rows), B is (T, n_cols)."""
    offs_r = row0 + tl.arange(0, BLOCK_M)
    offs_c = col0 + tl.arange(0, BLOCK_N)
    rr = offs_r % n_rows  # wrap instead of masking, as in the forward GEMM
    rc = offs_c % n_cols
    offs_t = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # The A^T tile (rows x tokens) is read straight from the token-major A: no transpose is materialised.
    a_ptrs = a_ptr + rr[:, None] * stride_ar + offs_t[None, :] * stride_at
    b_ptrs = b_ptr + offs_t[:, None] * stride_bt + rc[None, :] * stride_bc
    for t in range(0, T, BLOCK_K):
        if EVEN_T:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_t[None, :] < T - t, other=0.0)
            b = tl.load(b_ptrs, mask=offs_t[:, None] < T - t, other=0.0)
        if DOT_F32:  # interpreter only (see _common.dot_f32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if do_bias:  # uniform per program: the first column tile also sums its rows for the bias gradient
            bsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * stride_at
        b_ptrs += BLOCK_K * stride_bt
    mask_r = offs_r < n_rows
    tl.store(o_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc,
             acc.to(o_ptr.dtype.element_ty), mask=mask_r[:, None] & (offs_c[None, :] < n_cols))
    if do_bias:
        tl.store(bias_ptr + offs_r, bsum, mask=mask_r)


@triton.jit
def _weight_grad_kernel(
    g_ptr, dh_ptr, x_ptr, c_ptr, dw_ptr, dwu_ptr, dwd_ptr, db_ptr, dbd_ptr,
    T, N, K, R,
    stride_gt, stride_gn, stride_dht, stride_dhr, stride_xt, stride_xk, stride_ct, stride_cr,
    stride_dwn, stride_dwk, stride_dwun, stride_dwur, stride_dwdr, stride_dwdk,
    EVEN_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Tile space: region 1 = (row tiles of g, then of dh) x (column tiles of x); region 2 = (row tiles of g) x
    # (column tiles of c). Each region is walked in grouped order, like the forward GEMM.
    # Tiles along r are at most BLOCK_R (r padded to a power of two) wide: a 128-wide tile at r = 64 would compute
    # twice the branch's FLOPs and throw half away. (Static ifs: BLOCK_* are constexprs.)
    pid = tl.program_id(0)
    tiles_g = tl.cdiv(N, BLOCK_M)
    tiles_x = tl.cdiv(K, BLOCK_N)
    if BLOCK_M <= BLOCK_R:
        tiles_dh = tl.cdiv(R, BLOCK_M)
    else:
        tiles_dh = tl.cdiv(R, BLOCK_R)
    if BLOCK_N <= BLOCK_R:
        tiles_c = tl.cdiv(R, BLOCK_N)
    else:
        tiles_c = tl.cdiv(R, BLOCK_R)
    region1 = (tiles_g + tiles_dh) * tiles_x
    in_region2 = pid >= region1
    local = tl.where(in_region2, pid - region1, pid)
    num_pid_m = tl.where(in_region2, tiles_g, tiles_g + tiles_dh)
    num_pid_n = tl.where(in_region2, tiles_c, tiles_x)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = local // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((local % num_pid_in_group) % group_size_m)
    pid_n = (local % num_pid_in_group) // group_size_m
    col0 = pid_n * BLOCK_N
    do_bias = pid_n == 0

    # Each branch passes its own operands to the shared tile routine (no values are merged across branches).
    if in_region2:  # dW_up = g^T c: BLOCK_M x min(BLOCK_N, BLOCK_R) tiles
        if BLOCK_N <= BLOCK_R:
            _tn_tile(g_ptr, c_ptr, dwu_ptr, db_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, T, N, R,
                     stride_gt, stride_gn, stride_ct, stride_cr, stride_dwun, stride_dwur, False,
                     EVEN_T, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        else:
            _tn_tile(g_ptr, c_ptr, dwu_ptr, db_ptr, pid_m * BLOCK_M, pid_n * BLOCK_R, T, N, R,
                     stride_gt, stride_gn, stride_ct, stride_cr, stride_dwun, stride_dwur, False,
                     EVEN_T, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION, DOT_F32)
    elif pid_m < tiles_g:  # dW = g^T x, and db
        _tn_tile(g_ptr, x_ptr, dw_ptr, db_ptr, pid_m * BLOCK_M, col0, T, N, K,
                 stride_gt, stride_gn, stride_xt, stride_xk, stride_dwn, stride_dwk, do_bias,
                 EVEN_T, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
    else:  # dW_down = dh^T x, and db_down: min(BLOCK_M, BLOCK_R) x BLOCK_N tiles
        if BLOCK_M <= BLOCK_R:
            _tn_tile(dh_ptr, x_ptr, dwd_ptr, dbd_ptr, (pid_m - tiles_g) * BLOCK_M, col0, T, R, K,
                     stride_dht, stride_dhr, stride_xt, stride_xk, stride_dwdr, stride_dwdk, do_bias,
                     EVEN_T, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        else:
            _tn_tile(dh_ptr, x_ptr, dwd_ptr, dbd_ptr, (pid_m - tiles_g) * BLOCK_R, col0, T, R, K,
                     stride_dht, stride_dhr, stride_xt, stride_xk, stride_dwdr, stride_dwdk, do_bias,
                     EVEN_T, BLOCK_R, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)


# ---------------------------------------------------------------------------------------------------------------
# Launch configuration. On CUDA both kernels are autotuned once per shape; the configs are the usual Hopper/Ampere
# bf16 GEMM tiles. The autotuned wrappers are built lazily so that the interpreter never sees them (autotuning
# times kernels with CUDA events).

def _gemm_configs(name: str = "dual", elem_bytes: int = 2):
    tiles = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
             (64, 128, 64, 4, 4)]
    if name == "wgrad":  # its three tile routines do not share all buffers: 128x256x64 x3 stages exceeds 227 KB
        tiles = [t for t in tiles if t[:2] != (128, 256)]
    cfgs = []
    for bm, bn, bk, w, s in tiles:
        bk = bk * 2 // elem_bytes  # fp32 operands: half the K depth, the same shared memory per stage
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_warps=w, num_stages=s))
    return cfgs


_TUNED: dict = {}


def _tuned(name: str, elem_bytes: int):
    if (name, elem_bytes) not in _TUNED:
        kernel = {"dual": _dual_gemm_kernel, "wgrad": _weight_grad_kernel}[name]
        key = ["M", "N", "K1", "K2"] if name == "dual" else ["T", "N", "K", "R"]
        configs = _gemm_configs(name, elem_bytes)
        configs = configs if _common.autotune_enabled() else configs[:1]
        _TUNED[name, elem_bytes] = triton.autotune(configs=configs, key=key)(kernel)
    return _TUNED[name, elem_bytes]


def _interpret_meta() -> dict:
    return dict(_common.INTERPRET_BLOCKS)


def dual_gemm(a1, b1, a2, b2, bias, out_dtype):
    """out = a1 @ b1 + a2 @ b2 (+ bias). a*/b* are 2-D views (any strides); returns a new (M, N) tensor."""
    m, k1 = a1.shape
    n = b1.shape[1]
    k2 = a2.shape[1]
    out = _common.empty((m, n), out_dtype, a1.device)
    args = (
        a1, b1, a2, b2, bias if bias is not None else out, out,
        m, n, k1, k2,
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1),
        a2.stride(0), a2.stride(1), b2.stride(0), b2.stride(1),
        out.stride(0), out.stride(1),
    )
    common = dict(HAS_BIAS=bias is not None, PRECISION=_common.dot_precision(a1.dtype, a1.device),
                  DOT_F32=_common.dot_f32(a1))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if a1.device.type == "cuda":
        # EVEN_K1 depends on BLOCK_K, which the autotuner picks: every config's BLOCK_K divides 64, so
        # K1 % 64 == 0 (all widths that matter) makes it exact for all of them.
        _tuned("dual", a1.element_size())[grid](*args, EVEN_K1=k1 % 64 == 0, **common)
    else:
        meta = _interpret_meta()
        _dual_gemm_kernel[grid(meta)](*args, EVEN_K1=k1 % meta["BLOCK_K"] == 0, **common, **meta)
    return out


def weight_grads(g2, dh, x2, c, w_dtype, wu_dtype, wd_dtype):
    """Returns dW (N, K), dW_up (N, r), dW_down (r, K) and the fp32 bias gradients db (N,), db_down (r,)."""
    t, n = g2.shape
    k = x2.shape[1]
    r = dh.shape[1]
    dev = g2.device
    dw = _common.empty((n, k), w_dtype, dev)
    dwu = _common.empty((n, r), wu_dtype, dev)
    dwd = _common.empty((r, k), wd_dtype, dev)
    db = _common.empty((n,), torch.float32, dev)
    dbd = _common.empty((r,), torch.float32, dev)
    args = (
        g2, dh, x2, c, dw, dwu, dwd, db, dbd,
        t, n, k, r,
        g2.stride(0), g2.stride(1), dh.stride(0), dh.stride(1), x2.stride(0), x2.stride(1), c.stride(0), c.stride(1),
        dw.stride(0), dw.stride(1), dwu.stride(0), dwu.stride(1), dwd.stride(0), dwd.stride(1),
    )
    precision = _common.dot_precision(g2.dtype, dev)
    dot_f32 = _common.dot_f32(g2)
    br = _common.rank_block(r)

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        rows = triton.cdiv(n, bm)
        return ((rows + triton.cdiv(r, min(bm, br))) * triton.cdiv(k, bn) + rows * triton.cdiv(r, min(bn, br)),)

    if dev.type == "cuda":
        _tuned("wgrad", g2.element_size())[grid](*args, EVEN_T=t % 64 == 0, BLOCK_R=br, PRECISION=precision,
                                                 DOT_F32=dot_f32)
    else:
        meta = _interpret_meta()
        _weight_grad_kernel[grid(meta)](*args, EVEN_T=t % meta["BLOCK_K"] == 0, BLOCK_R=br, PRECISION=precision,
                                        DOT_F32=dot_f32, **meta)
    return dw, dwu, dwd, db, dbd

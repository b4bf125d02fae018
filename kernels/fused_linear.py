"""The full-width half of the layer: GEMMs that fold the rank-r branch into the main GEMM's loops.

`dual_gemm`:  out = A1 @ B1 + A2 @ B2 (+ bias), one output tile per program. Used twice:

    forward  y  = [x, c] @ [W, W_up]^T + b        A1 = x (T x in),  B1 = W^T,   A2 = c  (T x r), B2 = W_up^T
    backward dX = [g, dh] @ [W; W_down]           A1 = g (T x out), B1 = W,     A2 = dh (T x r), B2 = W_down

so the branch's up-projection (and, in backward, the down-projection's input gradient) is r more steps of the
main GEMM's K loop: no full-width branch tensor is written, and no read-modify-write pass over y or dX. The
operands are passed with strides, so nothing is concatenated or transposed in memory. Two forms (option
`dual_gemm`): "two_loops" runs the r steps as a second loop after the main loop (whose software pipeline drains
first); "one_loop" runs one loop over K1 + K2 whose loads switch operands at K1, so the branch's tiles are
prefetched while the last main tiles multiply.

`weight_grads`: one launch computing every weight gradient as tiles of one block matrix,

    [ dW       dW_up ]   [ g^T ]
    [ dW_down   ---- ] = [ dh^T ] @ [ x  c ]        (the dh^T c corner is not needed and not computed)

Rows of output tiles come from g (N rows) or dh (r rows), columns from x (K columns) or c (r columns). Compared
with dW alone, this adds one row of tiles (dh) and one column of tiles (c): the extra tiles re-read g and x
exactly as the main dW tiles do (mostly from L2), instead of a separate skinny GEMM streaming them from memory once
more. With a bias (HAS_BIAS), the programs of the first column of dW tiles also sum their g rows over tokens: db
comes from tiles already in registers. (db_down is freq1 * dphase1, summed by the CosNet backward.)

Each tile reduces over the tokens of its split: option dw="fused" is one split (all tokens, written straight into
the gradients); dw="splitk" is `split_count()` splits of equal token ranges, each writing an fp32 partial that
`partials.finish` sums in a fixed order (deterministic, no atomics), for shapes with too few tiles to fill the GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common, tuning


@triton.jit
def _k_loop(acc, a_ptr, b_ptr, rm, rn, K, stride_am, stride_ak, stride_bk, stride_bn,
            EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += A[rm, :K] @ B[:K, rn], advancing the operand pointers one K tile per step."""
    offs_kb = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_kb[None, :] * stride_ak
    b_ptrs = b_ptr + offs_kb[:, None] * stride_bk + rn[None, :] * stride_bn
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_kb[None, :] < K - k, other=0.0)
            b = tl.load(b_ptrs, mask=offs_kb[:, None] < K - k, other=0.0)
        if DOT_F32:  # interpreter only (see _common.dot_f32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _one_k_loop(acc, a1_ptr, b1_ptr, a2_ptr, b2_ptr, rm, rn, K1, K2,
                stride_a1m, stride_a1k, stride_b1k, stride_b1n, stride_a2m, stride_a2k, stride_b2k, stride_b2n,
                EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr):
    """acc += A1 @ B1 + A2 @ B2 in one loop over ceil(K1/BLOCK_K) + ceil(K2/BLOCK_K) tiles: each step selects its
    operands (scalar base pointers and strides), so the pipeline runs through the switch from A1 to A2."""
    offs_kb = tl.arange(0, BLOCK_K)
    n1 = tl.cdiv(K1, BLOCK_K)
    for i in range(0, n1 + tl.cdiv(K2, BLOCK_K)):
        first = i < n1
        k = tl.where(first, i, i - n1) * BLOCK_K
        a_ptrs = (tl.where(first, a1_ptr, a2_ptr) + rm[:, None] * tl.where(first, stride_a1m, stride_a2m)
                  + (k + offs_kb)[None, :] * tl.where(first, stride_a1k, stride_a2k))
        b_ptrs = (tl.where(first, b1_ptr, b2_ptr) + (k + offs_kb)[:, None] * tl.where(first, stride_b1k, stride_b2k)
                  + rn[None, :] * tl.where(first, stride_b1n, stride_b2n))
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = tl.where(first, K1, K2) - k
            a = tl.load(a_ptrs, mask=offs_kb[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_kb[:, None] < k_left, other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _dual_gemm_kernel(
    a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr,
    M, N, K1, K2,
    stride_a1m, stride_a1k, stride_b1k, stride_b1n,
    stride_a2m, stride_a2k, stride_b2k, stride_b2n,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, EVEN_K1: tl.constexpr, EVEN_K2: tl.constexpr, ONE_LOOP: tl.constexpr,
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ONE_LOOP:
        acc = _one_k_loop(acc, a1_ptr, b1_ptr, a2_ptr, b2_ptr, rm, rn, K1, K2,
                          stride_a1m, stride_a1k, stride_b1k, stride_b1n, stride_a2m, stride_a2k, stride_b2k,
                          stride_b2n, EVEN_K1 and EVEN_K2, BLOCK_K, PRECISION, DOT_F32)
    else:  # the main K loop, then the branch's r steps over the r-wide operand and its weight
        acc = _k_loop(acc, a1_ptr, b1_ptr, rm, rn, K1, stride_a1m, stride_a1k, stride_b1k, stride_b1n,
                      EVEN_K1, BLOCK_K, PRECISION, DOT_F32)
        acc = _k_loop(acc, a2_ptr, b2_ptr, rm, rn, K2, stride_a2m, stride_a2k, stride_b2k, stride_b2n,
                      False, BLOCK_K, PRECISION, DOT_F32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tn_tile(
    a_ptr, b_ptr, o_ptr, bias_ptr, row0, col0, t0, t1, n_rows, n_cols,
    stride_at, stride_ar, stride_bt, stride_bc, stride_or, stride_oc, do_bias,
    BIAS: tl.constexpr, EVEN_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) tile of A^T B reduced over tokens t0..t1; A is (T, n_rows), B is (T, n_cols).
    BIAS: this call site may sum A's rows (compiled in); do_bias: this program does (the first column tile)."""
    offs_r = row0 + tl.arange(0, BLOCK_M)
    offs_c = col0 + tl.arange(0, BLOCK_N)
    rr = offs_r % n_rows  # wrap instead of masking, as in the forward GEMM
    rc = offs_c % n_cols
    offs_t = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    bsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # The A^T tile (rows x tokens) is read straight from the token-major A: no transpose is materialised.
    a_ptrs = a_ptr + rr[:, None] * stride_ar + (t0 + offs_t)[None, :] * stride_at
    b_ptrs = b_ptr + (t0 + offs_t)[:, None] * stride_bt + rc[None, :] * stride_bc
    for t in range(t0, t1, BLOCK_K):
        if EVEN_T:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_t[None, :] < t1 - t, other=0.0)
            b = tl.load(b_ptrs, mask=offs_t[:, None] < t1 - t, other=0.0)
        if DOT_F32:  # interpreter only (see _common.dot_f32)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if BIAS:
            if do_bias:  # uniform per program
                bsum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += BLOCK_K * stride_at
        b_ptrs += BLOCK_K * stride_bt
    mask_r = offs_r < n_rows
    tl.store(o_ptr + offs_r[:, None] * stride_or + offs_c[None, :] * stride_oc,
             acc.to(o_ptr.dtype.element_ty), mask=mask_r[:, None] & (offs_c[None, :] < n_cols))
    if BIAS:
        if do_bias:
            tl.store(bias_ptr + offs_r, bsum, mask=mask_r)


@triton.jit
def _weight_grad_kernel(
    g_ptr, dh_ptr, x_ptr, c_ptr, dw_ptr, dwu_ptr, dwd_ptr, db_ptr,
    T, N, K, R, T_SPLIT,
    stride_gt, stride_gn, stride_dht, stride_dhr, stride_xt, stride_xk, stride_ct, stride_cr,
    stride_dwn, stride_dwk, stride_dwun, stride_dwur, stride_dwdr, stride_dwdk,
    split_dw, split_dwu, split_dwd, split_db,
    HAS_BIAS: tl.constexpr, EVEN_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    # Grid: (output tiles, token splits). Split s reduces tokens [s * T_SPLIT, min(T, (s + 1) * T_SPLIT)) and
    # writes its tiles at offset s * split_* (0 with one split: straight into the gradients).
    # Tile space: region 1 = (row tiles of g, then of dh) x (column tiles of x); region 2 = (row tiles of g) x
    # (column tiles of c). Each region is walked in grouped order, like the forward GEMM.
    # Tiles along r are at most BLOCK_R (r padded to a power of two) wide: a 128-wide tile at r = 64 would compute
    # twice the branch's FLOPs and throw half away. (Static ifs: BLOCK_* are constexprs.)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    t0 = split * T_SPLIT
    t1 = tl.minimum(T, t0 + T_SPLIT)
    dw_ptr += split * split_dw
    dwu_ptr += split * split_dwu
    dwd_ptr += split * split_dwd
    db_ptr += split * split_db
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

    # Each branch passes its own operands to the shared tile routine (no values are merged across branches).
    if in_region2:  # dW_up = g^T c: BLOCK_M x min(BLOCK_N, BLOCK_R) tiles
        if BLOCK_N <= BLOCK_R:
            _tn_tile(g_ptr, c_ptr, dwu_ptr, db_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, t0, t1, N, R,
                     stride_gt, stride_gn, stride_ct, stride_cr, stride_dwun, stride_dwur, False,
                     False, EVEN_T, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        else:
            _tn_tile(g_ptr, c_ptr, dwu_ptr, db_ptr, pid_m * BLOCK_M, pid_n * BLOCK_R, t0, t1, N, R,
                     stride_gt, stride_gn, stride_ct, stride_cr, stride_dwun, stride_dwur, False,
                     False, EVEN_T, BLOCK_M, BLOCK_R, BLOCK_K, PRECISION, DOT_F32)
    elif pid_m < tiles_g:  # dW = g^T x, and db
        _tn_tile(g_ptr, x_ptr, dw_ptr, db_ptr, pid_m * BLOCK_M, col0, t0, t1, N, K,
                 stride_gt, stride_gn, stride_xt, stride_xk, stride_dwn, stride_dwk, pid_n == 0,
                 HAS_BIAS, EVEN_T, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
    else:  # dW_down = dh^T x: min(BLOCK_M, BLOCK_R) x BLOCK_N tiles
        if BLOCK_M <= BLOCK_R:
            _tn_tile(dh_ptr, x_ptr, dwd_ptr, db_ptr, (pid_m - tiles_g) * BLOCK_M, col0, t0, t1, R, K,
                     stride_dht, stride_dhr, stride_xt, stride_xk, stride_dwdr, stride_dwdk, False,
                     False, EVEN_T, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)
        else:
            _tn_tile(dh_ptr, x_ptr, dwd_ptr, db_ptr, (pid_m - tiles_g) * BLOCK_R, col0, t0, t1, R, K,
                     stride_dht, stride_dhr, stride_xt, stride_xk, stride_dwdr, stride_dwdk, False,
                     False, EVEN_T, BLOCK_R, BLOCK_N, BLOCK_K, PRECISION, DOT_F32)


def dual_gemm(a1, b1, a2, b2, bias, out_dtype, one_loop: bool = False):
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
    name = "dual_gemm_one_loop" if one_loop else "dual_gemm"
    meta = tuning.plan(name, a1.element_size(), a1.device)
    step = tuning.align(meta)
    kwargs = dict(HAS_BIAS=bias is not None, EVEN_K1=k1 % step == 0, EVEN_K2=k2 % step == 0, ONE_LOOP=one_loop,
                  PRECISION=_common.dot_precision(a1.dtype, a1.device), DOT_F32=_common.dot_f32(a1))

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # The B layouts are in the key: the forward (W^T) and dX (W) GEMMs of a square layer tune separately.
    key = ["M", "N", "K1", "K2", "stride_b1k", "stride_b1n"]
    tuning.launch(name, _dual_gemm_kernel, key, grid, meta, a1.element_size(), args, kwargs)
    return out


# Split-K: about two waves of programs on the GPU, each split at least MIN_SPLIT_TOKENS tokens (enough K steps to
# hide the pipeline's prologue and the fp32 partial's extra write), at most MAX_SPLIT.
MIN_SPLIT_TOKENS = 1024
MAX_SPLIT = 16
_REFERENCE_SMS = 132  # H100 SXM; also the rule's value off CUDA, so that it does not depend on the test machine


def _sm_count(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _REFERENCE_SMS


def split_count(t: int, n: int, k: int, sms: int = _REFERENCE_SMS, min_tokens: int = MIN_SPLIT_TOKENS) -> int:
    """How many token ranges the split-K weight-gradient kernel uses at T tokens, in -> out = k -> n: enough to
    give ~2 programs per SM at the 128x128 reference tile (dW tiles, the dW_down row and the dW_up column), at
    most one per `min_tokens` tokens. llm-250m (16384 tokens, r <= 128): 4 for q/k/v/o, 1 for fc/fc2."""
    tiles = triton.cdiv(n, 128) * triton.cdiv(k, 128) + triton.cdiv(k, 128) + triton.cdiv(n, 128)
    want = triton.cdiv(2 * sms, tiles)
    return max(1, min(want, t // min_tokens, MAX_SPLIT))


def _splits(t, n, k, r, device, step) -> tuple[int, int]:
    """(splits, tokens per split): ranges a multiple of `step` tokens (whole K tiles), none empty, and the fp32
    partials' offsets within int32. Interpreter: ranges of two K tiles, so that tiny test shapes split."""
    min_tokens = MIN_SPLIT_TOKENS if device.type == "cuda" else 2 * step
    s = split_count(t, n, k, _sm_count(device), min_tokens)
    s = max(1, min(s, (2**31 - 1) // max(n * k, n * r, r * k)))
    chunk = triton.cdiv(triton.cdiv(t, s), step) * step
    return triton.cdiv(t, chunk), chunk


def weight_grads(g2, dh, x2, c, dtypes, has_bias: bool, splitk: bool = False):
    """dW (N, K), dW_up (N, r), dW_down (r, K) in `dtypes` and db (N,) fp32 (None without a bias).

    With splitk and more than one split at this shape: returns (splits, fp32 partials of those four), to be
    summed by `partials.finish`; else (1, the gradients)."""
    t, n = g2.shape
    k = x2.shape[1]
    r = dh.shape[1]
    dev = g2.device
    splits, chunk = 1, t
    if splitk:
        step = tuning.align(tuning.plan("weight_grad_splitk", g2.element_size(), dev))
        splits, chunk = _splits(t, n, k, r, dev, step)
    # one range: the fused kernel, straight into the gradients; else fp32 partials, one per range
    name = "weight_grad_splitk" if splits > 1 else "weight_grad"
    meta = tuning.plan(name, g2.element_size(), dev)
    out_dtypes, lead = (dtypes, ()) if splits == 1 else ((torch.float32,) * 3, (splits,))
    dw = _common.empty((*lead, n, k), out_dtypes[0], dev)
    dwu = _common.empty((*lead, n, r), out_dtypes[1], dev)
    dwd = _common.empty((*lead, r, k), out_dtypes[2], dev)
    db = _common.empty((*lead, n), torch.float32, dev) if has_bias else None
    per_split = [a[0].numel() if splits > 1 else 0 for a in (dw, dwu, dwd)]
    args = (
        g2, dh, x2, c, dw, dwu, dwd, db if has_bias else dw,
        t, n, k, r, chunk,
        g2.stride(0), g2.stride(1), dh.stride(0), dh.stride(1), x2.stride(0), x2.stride(1), c.stride(0), c.stride(1),
        dw.stride(-2), dw.stride(-1), dwu.stride(-2), dwu.stride(-1), dwd.stride(-2), dwd.stride(-1),
        *per_split, n if splits > 1 else 0,
    )
    br = _common.rank_block(r)
    # every range is whole K tiles (chunk is a multiple of the K tile), so T's tail is the only ragged one
    kwargs = dict(HAS_BIAS=has_bias, EVEN_T=t % tuning.align(meta) == 0, BLOCK_R=br,
                  PRECISION=_common.dot_precision(g2.dtype, dev), DOT_F32=_common.dot_f32(g2))

    def grid(meta):
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        rows = triton.cdiv(n, bm)
        return ((rows + triton.cdiv(r, min(bm, br))) * triton.cdiv(k, bn) + rows * triton.cdiv(r, min(bn, br)),
                splits)

    tuning.launch(name, _weight_grad_kernel, ["T", "N", "K", "R", "T_SPLIT"], grid, meta, g2.element_size(), args,
                  kwargs)
    return splits, (dw, dwu, dwd, db)

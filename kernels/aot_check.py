"""Compile every kernel for a CUDA target without a GPU (a developer check; it uses Triton internals).

    python -m noble_kernels.aot_check [--arch 90] [--dtype bf16|fp32] [--tokens 16384 --d 1024 --r 64]

Triton's interpreter (what the CPU tests use) runs the kernels in numpy and does not see the compiler's rules
(types merged across branches, dot shapes, layouts). This builds each kernel's argument list the way a real launch
at the given shape would specialise it (pointers 16-byte aligned, integers equal to 1 as constants, integers
divisible by 16 marked so) and compiles it to PTX/cubin for the target with the ptxas bundled with Triton, then
prints registers, spills, shared memory and whether the main loops use wgmma and are software-pipelined.
Written against Triton 3.8's `ASTSource(fn, signature, constexprs, attrs)`. `--kernels` takes names from
`noble_kernels.autotune_space()`.
"""

from __future__ import annotations

import argparse
import time

import torch


def _specialise(fn, values: dict, constexprs: dict):
    """signature / constexprs / attrs for `fn` from example argument values (tensors, ints) and constexprs."""
    sig, consts, attrs = {}, {}, {}
    tl_names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            consts[name] = constexprs[name]
            continue
        v = values[name]
        if isinstance(v, torch.Tensor):
            sig[name] = "*" + tl_names[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: {type(v)}")
    return sig, consts, attrs


def _resource_usage(cubin):
    """(registers, spill store bytes) from the bundled cuobjdump; (None, None) if it cannot be run."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                  timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs = re.search(r"REG:(\d+)", text)
    spill = re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _compile(fn, values, constexprs, arch, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = _specialise(fn, values, constexprs)
    t0 = time.time()
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    regs, spills = _resource_usage(k.asm.get("cubin"))
    info = {
        "kernel": fn.__name__, "warps": num_warps, "stages": num_stages, "seconds": round(time.time() - t0, 1),
        "shared": k.metadata.shared, "regs": regs, "spill_bytes": spills,
        "wgmma": ptx.count("wgmma.mma_async"), "mma.sync": ptx.count("mma.sync"),
        "async_copies": ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy"),
    }
    print("  ".join(f"{a}={b}" for a, b in info.items()), flush=True)
    return info


def _m(shape, dtype, strides=None):
    return torch.empty_strided(shape, strides or torch.empty(shape, device="meta").stride(), dtype=dtype,
                               device="meta")


def main(argv=None) -> list[dict]:
    from . import cosnet, fused_linear, partials, tuning
    from ._common import next_pow2, rank_block

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=1024, help="input width")
    p.add_argument("--out", type=int, default=4096, help="output width")
    p.add_argument("--r", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="only the first autotune config of each kernel")
    p.add_argument("--kernels", default=",".join(tuning.KERNELS), help="comma-separated kernel names")
    a = p.parse_args(argv)
    dt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    f32 = torch.float32
    T, K, N, R = a.tokens, a.d, a.out, a.r
    prec = "ieee" if dt != f32 else "tf32"
    chain = "tf32"
    br = rank_block(R)
    esize = 2 if dt != f32 else 4
    wanted = set(a.kernels.split(","))
    vec = _m((R,), f32)
    out = []

    def each(name, fn, vals, constexprs):
        if name not in wanted:
            return
        for cfg in tuning.autotune_space(esize)[name][: 1 if a.quick else None]:
            tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k == "GROUP_M"}
            info = _compile(fn, vals, {**constexprs, **tiles}, a.arch, cfg["num_warps"], cfg["num_stages"])
            out.append({"name": name, **info})

    x, wd, mw = _m((T, K), dt), _m((R, K), dt), _m((R, R), f32)
    h, c = _m((T, R), f32), _m((T, R), dt)
    w, wu = _m((N, K), dt), _m((N, R), dt)
    g, dh = _m((T, N), dt), _m((T, R), dt)

    print(f"# forward r-wide: h, c from x ({T}x{K}), r={R}")
    vals = dict(x_ptr=x, wd_ptr=wd, bd_ptr=vec, f1_ptr=vec, p1_ptr=vec, mw_ptr=mw, mb_ptr=vec, f2_ptr=vec,
                p2_ptr=vec, h_ptr=h, c_ptr=c, M=T, K=K, R=R, stride_xm=K, stride_xk=1, stride_wr=K, stride_wk=1,
                stride_mo=R, stride_mi=1, stride_hm=R, stride_cm=R)
    each("down_cosnet_fwd", cosnet._down_cosnet_fwd_kernel, vals,
         dict(HAS_BD=True, HAS_MB=True, BLOCK_R=br, PRECISION=prec, CHAIN_PRECISION=chain, DOT_F32=False))

    for one_loop in (False, True):
        name = "dual_gemm_one_loop" if one_loop else "dual_gemm"
        print(f"# forward GEMM ({name}): [x, c] @ [W, W_up]^T + b -> ({T}x{N})")
        vals = dict(a1_ptr=x, b1_ptr=w, a2_ptr=c, b2_ptr=wu, bias_ptr=_m((N,), f32), out_ptr=_m((T, N), dt),
                    M=T, N=N, K1=K, K2=R, stride_a1m=K, stride_a1k=1, stride_b1k=1, stride_b1n=K, stride_a2m=R,
                    stride_a2k=1, stride_b2k=1, stride_b2n=R, stride_om=N, stride_on=1)
        gemm = dict(EVEN_K1=True, EVEN_K2=True, ONE_LOOP=one_loop, PRECISION=prec, DOT_F32=False)
        each(name, fused_linear._dual_gemm_kernel, vals, dict(HAS_BIAS=True, **gemm))
        print(f"# backward GEMM ({name}): dX = [g, dh] @ [W; W_down] -> ({T}x{K})")
        dx = _m((T, K), dt)
        vals = dict(a1_ptr=g, b1_ptr=w, a2_ptr=dh, b2_ptr=wd, bias_ptr=dx, out_ptr=dx, M=T, N=K, K1=N, K2=R,
                    stride_a1m=N, stride_a1k=1, stride_b1k=K, stride_b1n=1, stride_a2m=R, stride_a2k=1,
                    stride_b2k=K, stride_b2n=1, stride_om=K, stride_on=1)
        each(name, fused_linear._dual_gemm_kernel, vals, dict(HAS_BIAS=False, **gemm))

    print(f"# backward r-wide: dh from g ({T}x{N})")
    P, rows = T // tuning.BWD_BLOCK_M, len(partials.VEC_ROWS)
    vals = dict(g_ptr=g, wu_ptr=wu, h_ptr=h, f1_ptr=vec, p1_ptr=vec, mw_ptr=mw, mb_ptr=vec, f2_ptr=vec, p2_ptr=vec,
                dh_ptr=dh, vec_part_ptr=_m((P, rows, br), f32), mat_part_ptr=_m((P, br, br), f32),
                M=T, N=N, R=R, stride_gm=N, stride_gn=1, stride_wun=R, stride_wur=1, stride_mo=R, stride_mi=1,
                stride_hm=R, stride_dhm=R)
    each("cosnet_bwd", cosnet._cosnet_bwd_kernel, vals,
         dict(HAS_MB=True, VEC_ROWS=rows, BLOCK_R=br, PRECISION=prec, CHAIN_PRECISION=chain, DOT_F32=False))

    splits = fused_linear.split_count(T, N, K)
    for name, s in (("weight_grad", 1), ("weight_grad_splitk", max(2, splits))):
        chunk = T // s
        for has_bias in (False, True):
            print(f"# backward weight gradients ({name}, {s} split(s), bias={has_bias}): [g, dh]^T [x, c]")
            outs = [_m((N, K), dt if s == 1 else f32), _m((N, R), dt if s == 1 else f32),
                    _m((R, K), dt if s == 1 else f32)]
            vals = dict(g_ptr=g, dh_ptr=dh, x_ptr=x, c_ptr=c, dw_ptr=outs[0], dwu_ptr=outs[1], dwd_ptr=outs[2],
                        db_ptr=_m((N,), f32), T=T, N=N, K=K, R=R, T_SPLIT=chunk, stride_gt=N, stride_gn=1,
                        stride_dht=R, stride_dhr=1, stride_xt=K, stride_xk=1, stride_ct=R, stride_cr=1,
                        stride_dwn=K, stride_dwk=1, stride_dwun=R, stride_dwur=1, stride_dwdr=K, stride_dwdk=1,
                        split_dw=0 if s == 1 else N * K, split_dwu=0 if s == 1 else N * R,
                        split_dwd=0 if s == 1 else R * K, split_db=0 if s == 1 else N)
            each(name, fused_linear._weight_grad_kernel, vals,
                 dict(HAS_BIAS=has_bias, EVEN_T=True, BLOCK_R=br, PRECISION=prec, DOT_F32=False))

    s = max(2, splits)
    print(f"# finalize: CosNet rows ({P}) and {s} split-K partials")
    vals = dict(vec_ptr=_m((P, rows, br), f32), mat_ptr=_m((P, br, br), f32), o_f1=vec, o_p1=vec, o_mb=vec,
                o_f2=vec, o_p2=vec, o_bd=vec, o_mix=mw, ws_dw=_m((s, N, K), f32), ws_dwu=_m((s, N, R), f32),
                ws_dwd=_m((s, R, K), f32), ws_db=_m((s, N), f32), o_dw=w, o_dwu=wu, o_dwd=wd, o_db=_m((N,), f32),
                P=P, S=s, N=N, K=K, R=R, BR=br)
    each("finalize", partials._finalize_kernel, vals,
         dict(HAS_SPLIT=True, HAS_BIAS=True, BLOCK_S=next_pow2(s)))
    return out


if __name__ == "__main__":
    main()

"""Launch configurations of every kernel: the autotune space, forcing one config, and the launch itself.

On CUDA each kernel is autotuned over its configs once per shape (NOBLE_KERNELS_AUTOTUNE=0: the first config).
`forced_config(name, i)` runs config i only, so that a correctness suite can run every config of every kernel once
(a miscompile in a config the autotuner does not pick at small shapes would otherwise show only at training
shapes). Under the interpreter each kernel runs small fixed tiles (`_common.INTERPRET_BLOCKS`), or the forced
config's tiles.

The tables are plain data (no triton import), so `autotune_space()` works where triton is missing.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from . import _common

# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K at 2-byte elements, num_warps, num_stages): the usual Hopper/Ampere bf16
# tiles. fp32 operands halve BLOCK_K (the same shared memory per stage), so every BLOCK_K divides 64.
_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
               (64, 128, 64, 4, 4)]
# The weight-gradient tile routines do not share all buffers: 128x256x64 at 3 stages exceeds 227 KB.
_WGRAD_TILES = [t for t in _GEMM_TILES if t[:2] != (128, 256)]
ALIGN_K = 64  # every GEMM config's BLOCK_K divides this

# The r-wide kernels. BLOCK_M trades the L2 re-reads of the small weight (each token block reads all of W_down /
# W_up) against registers for the chain. The backward keeps BLOCK_M fixed so that its number of partial rows
# does not depend on the config.
_FWD_TILES = [(64, 64, 4, 3), (64, 64, 8, 3), (32, 64, 4, 3), (128, 64, 8, 3)]  # BLOCK_M, BLOCK_K, warps, stages
BWD_BLOCK_M = 64
_BWD_TILES = [(64, 8, 3), (64, 4, 3), (128, 8, 3), (32, 4, 4)]  # BLOCK_N, warps, stages
# finalize: BLOCK_P partial rows x BLOCK_C columns per step
_FINALIZE_TILES = [(16, 256, 4), (64, 64, 4), (32, 128, 8)]  # BLOCK_P, BLOCK_C, warps


def _gemm(tiles, elem_bytes):
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk * 2 // elem_bytes, "GROUP_M": 8, "num_warps": w,
             "num_stages": s} for bm, bn, bk, w, s in tiles]


def _configs(name: str, elem_bytes: int) -> list:
    if name in ("dual_gemm", "dual_gemm_one_loop"):
        return _gemm(_GEMM_TILES, elem_bytes)
    if name in ("weight_grad", "weight_grad_splitk"):
        return _gemm(_WGRAD_TILES, elem_bytes)
    if name == "down_cosnet_fwd":
        return [{"BLOCK_M": bm, "BLOCK_K": bk, "num_warps": w, "num_stages": s} for bm, bk, w, s in _FWD_TILES]
    if name == "cosnet_bwd":
        return [{"BLOCK_M": BWD_BLOCK_M, "BLOCK_N": bn, "num_warps": w, "num_stages": s} for bn, w, s in _BWD_TILES]
    if name == "finalize":
        return [{"BLOCK_P": p, "BLOCK_C": c, "num_warps": w, "num_stages": 3} for p, c, w in _FINALIZE_TILES]
    raise ValueError(f"unknown kernel {name!r}; kernels: {', '.join(KERNELS)}")


# kernel name -> (what it computes, the KernelOptions overrides under which cosnet_linear launches it)
KERNELS = {
    "down_cosnet_fwd": ("forward r-wide: h, c from x", {}),
    "dual_gemm": ("y = [x, c] [W, W_up]^T + b and dX = [g, dh] [W; W_down], two K loops", {"gemm": "triton"}),
    "dual_gemm_one_loop": ("the same, one K loop", {"gemm": "triton", "dual_gemm": "one_loop"}),
    "cosnet_bwd": ("backward r-wide: dh and CosNet partial gradients from g", {}),
    "weight_grad": ("dW, dW_up, dW_down (+ db), all tokens per tile", {"gemm": "triton", "dw": "fused"}),
    "weight_grad_splitk": ("the same over token ranges; needs split_count() > 1 at the shape",
                           {"gemm": "triton", "dw": "splitk"}),
    "finalize": ("sums of per-block partial gradients, one launch", {"partials": "finalize"}),
}


def autotune_space(elem_bytes: int = 2) -> dict:
    """kernel name -> its configs as plain dicts (block sizes, num_warps, num_stages), in autotune order, for
    operands of `elem_bytes` bytes (2: bf16/fp16; 4: fp32 halves the GEMMs' BLOCK_K). Index i of a kernel's list
    is the same config for both element sizes. `KERNELS[name][1]`: the options under which the kernel runs."""
    return {name: _configs(name, elem_bytes) for name in KERNELS}


_FORCED: dict = {}


@contextlib.contextmanager
def forced_config(kernel_name: str, index: int):
    """Within this block, `kernel_name` runs only its config `index` (no autotuning), on CUDA and under the
    interpreter (whose launches then use that config's tiles)."""
    n = len(_configs(kernel_name, 2))
    if not 0 <= index < n:
        raise ValueError(f"forced_config: {kernel_name} has configs 0..{n - 1}, not {index}")
    old = _FORCED.get(kernel_name)
    _FORCED[kernel_name] = index
    try:
        yield _configs(kernel_name, 2)[index]
    finally:
        if old is None:
            del _FORCED[kernel_name]
        else:
            _FORCED[kernel_name] = old


def _interpret_meta(name: str) -> dict:
    b = _common.INTERPRET_BLOCKS
    if name == "down_cosnet_fwd":
        return {"BLOCK_M": b["BLOCK_M"], "BLOCK_K": b["BLOCK_K"]}
    if name == "cosnet_bwd":
        return {"BLOCK_M": b["BLOCK_M"], "BLOCK_N": b["BLOCK_K"]}
    if name == "finalize":  # several part chunks and column blocks at tiny shapes
        return {"BLOCK_P": 4, "BLOCK_C": 16}
    return dict(b)


def plan(name: str, elem_bytes: int, device) -> Optional[dict]:
    """The one config a launch of `name` will use (tiles plus num_warps/num_stages), or None when the autotuner
    will pick one (CUDA, autotuning on, nothing forced)."""
    if name in _FORCED:
        return _configs(name, elem_bytes)[_FORCED[name]]
    if getattr(device, "type", device) != "cuda":
        return _interpret_meta(name)
    if not _common.autotune_enabled():
        return _configs(name, elem_bytes)[0]
    return None


def align(meta: Optional[dict], block: str = "BLOCK_K") -> int:
    """A length that is a multiple of this is a multiple of `block` in whichever config runs."""
    return meta[block] if meta is not None else ALIGN_K


_TUNED: dict = {}
_RECORDS: list = []  # the lists of the open record_launches() blocks


def launch(name: str, kernel, key: list, grid, meta: Optional[dict], elem_bytes: int, args: tuple, kwargs: dict):
    """Launch `kernel` (a @triton.jit function) as kernel `name`: with `meta` (from `plan`) if given, else through
    its autotuner (keyed on the argument names in `key`). `grid(meta)` gives the launch grid."""
    if meta is None:
        tk = (name, elem_bytes)
        if tk not in _TUNED:
            import triton

            configs = [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK") or k == "GROUP_M"},
                                     num_warps=c["num_warps"], num_stages=c["num_stages"])
                       for c in _configs(name, elem_bytes)]
            _TUNED[tk] = triton.autotune(configs=configs, key=key)(kernel)
        _TUNED[tk][grid](*args, **kwargs)
        best = _TUNED[tk].best_config
        used = {**best.kwargs, "num_warps": best.num_warps, "num_stages": best.num_stages}
    else:
        kernel[grid(meta)](*args, **kwargs, **meta)
        used = meta
    for record in _RECORDS:
        record.append((name, dict(used)))


@contextlib.contextmanager
def record_launches():
    """Collects (kernel name, config used) of every launch inside the block, in order (nested blocks each get
    their launches)."""
    record: list = []
    _RECORDS.append(record)
    try:
        yield record
    finally:
        _RECORDS.remove(record)

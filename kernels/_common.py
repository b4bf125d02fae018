"""Shared helpers of the Triton kernels: output allocation (poisonable for tests), block-size choices, precision.

Nothing here imports triton, so `import noble_kernels` works on machines without it.
"""

from __future__ import annotations

import contextlib
import os

import torch

# Tests set this (through `poisoned()`) so that every buffer a kernel is supposed to write completely starts as NaN:
# an element a kernel forgets to write then shows up as NaN in the result instead of as plausible stale memory.
POISON = False


@contextlib.contextmanager
def poisoned(on: bool = True):
    """Within this block, kernel outputs are allocated filled with NaN instead of left uninitialised."""
    global POISON
    old, POISON = POISON, on
    try:
        yield
    finally:
        POISON = old


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET is set: kernels decorated from now on run in Triton's numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising something else
        return False
    return True


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rank_block(r: int) -> int:
    """The padded width of the r-wide bottleneck in registers: a power of two, >= 16 (tl.dot's minimum)."""
    return max(16, next_pow2(r))


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision for the full-width GEMMs, matching what torch would do for the same inputs.

    bf16/fp16 inputs: irrelevant (tensor cores, fp32 accumulation). fp32 inputs: TF32 only when torch allows it
    (`torch.backends.cuda.matmul.allow_tf32` / `set_float32_matmul_precision`), else exact fp32 ("ieee").
    """
    if dtype != torch.float32 or device.type != "cuda":
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


# Block sizes. On CUDA the two full-width GEMM kernels are autotuned (see fused_linear.py); the r-wide kernels use
# the fixed sizes below. Under the interpreter every launch runs in numpy, so tiles are small (tests then cover
# several tiles and ragged tails with tiny shapes). Tests may edit INTERPRET_BLOCKS.
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
CUDA_RWIDE = {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}

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
    return "tf32" if _torch_allows_tf32() else "ieee"


def _torch_allows_tf32() -> bool:
    """torch's TF32 switch for cuBLAS matmuls. torch >= 2.9 raises on the legacy flag once a program has also used
    the new `fp32_precision` API; then the new one answers."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return getattr(matmul, "fp32_precision", "none") == "tf32"


def chain_precision(dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot precision of the r x r products inside the CosNet chain (fp32 operands in registers).

    With bf16/fp16 compute, TF32 is already more precise than the torch path (whose mix Linear runs in bf16 under
    autocast), and exact fp32 ("ieee") dots run on CUDA cores and spill registers (see aot_check). With fp32
    compute, the same rule as the main GEMMs."""
    if device.type != "cuda":
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return dot_precision(dtype, device)


def dot_f32(t: torch.Tensor) -> bool:
    """Upcast tl.dot operands to fp32 inside the kernels: only for bf16 under the interpreter, whose tl.dot is
    numpy's matmul over the raw 16-bit patterns (numpy has no bfloat16) and returns garbage. Never on a GPU."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def autotune_enabled() -> bool:
    """NOBLE_KERNELS_AUTOTUNE=0: launch the first config of each kernel instead of autotuning (faster start-up)."""
    return os.environ.get("NOBLE_KERNELS_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


# Block sizes. On CUDA every kernel is autotuned (tuning.py). Under the interpreter each launch runs in numpy, so
# tiles are small: tests then cover several tiles and ragged tails with tiny shapes.
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}

"""What every `noble bench` command shares: devices and precisions, timing, memory, output that is written as
results come in (a run cut off at any point keeps everything finished before the cut)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from noble_cli.atomic import atomic_write_json
from noble_cli.errors import NobleError
from noble_cli.layers.implementation import (
    fused_unavailable_reason,
    has_fused_kernel,
    import_noble_kernels,
)
from noble_cli.parsing import split_list

VARIANTS = ("baseline", "noble-torch", "noble-triton", "noble-triton-cublas")
# fused variants -> the noble_kernels options they run under
FUSED_VARIANTS = {"noble-triton": {}, "noble-triton-cublas": {"gemm": "torch"}}


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise NobleError(f"unknown device {name!r}; valid: auto, cuda, cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NobleError("--device cuda: no CUDA GPU is visible")
    if dev.type not in ("cuda", "cpu"):
        raise NobleError(f"unknown device {name!r}; valid: auto, cuda, cpu")
    return dev


def device_slug(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def precision_of(name: str, dev: torch.device) -> str:
    if name == "auto":
        return "bf16-mixed" if dev.type == "cuda" else "32"
    if name not in ("32", "bf16-mixed"):
        raise NobleError(f"unknown precision {name!r}; valid: auto, 32, bf16-mixed")
    return name


def prec_label(precision: str) -> str:
    return "fp32" if precision == "32" else "bf16 autocast"


def autocast(dev: torch.device, precision: str):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def csv_items(value: str, what: str, valid: tuple[str, ...] | None = None) -> list[str]:
    items = split_list(value)
    if not items:
        raise NobleError(f"--{what} is empty")
    if valid:
        for v in items:
            if v not in valid:
                noun = what[:-1] if what.endswith("s") else what
                raise NobleError(f"unknown {noun} {v!r}; valid: {', '.join(valid)}")
    return items


def csv_ints(value: str, what: str) -> list[int]:
    try:
        return [int(v) for v in csv_items(value, what)]
    except ValueError:
        raise NobleError(f"--{what} must be comma-separated integers, got {value!r}") from None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], None], dev: torch.device, warmup: int, iters: int) -> list[float]:
    """Per-iteration times in ms: CUDA events around each call on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(dev)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return times


def kernel_ms(fn: Callable[[], None], dev: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of one call in ms for micro-benchmarks: `triton.testing.do_bench` on a GPU (it flushes the L2
    cache before every call, so a kernel does not read its operands from the previous call's cache), a few
    wall-clock calls on a CPU (where the times mean nothing: the interpreter)."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return statistics.median(time_ms(fn, dev, 0, 1))


def reset_memory(dev: torch.device) -> None:
    """Frees what the last row left and restarts the peak count (a GPU's; a CPU has none to reset, and a full
    collection there would only cost time)."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None


def triton_skip_reason(dev: torch.device) -> str | None:
    """Why the fused variants cannot run here, or None if they can (noble_cli/layers/implementation.py)."""
    return fused_unavailable_reason(dev)


@contextlib.contextmanager
def kernel_options(**overrides):
    """noble_kernels' design switches for the calls inside the block (`noble_kernels.options`)."""
    if not overrides:
        yield
        return
    with import_noble_kernels().options(**overrides):
        yield


def use_fused(layers) -> None:
    """Point NobleLinear `layers` at the fused kernels (their own dispatch, exactly what training runs)."""
    for layer in layers:
        if not has_fused_kernel(layer.activation):
            raise NobleError(f"the fused kernels implement the cosnet branch only, not {layer.activation}")
        layer.kernel = "triton"


def fresh_compile(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with a clean dynamo cache and static shapes, for every compiled row.

    All NobleLinear instances share one forward: across many rows (shapes x ranks x kernels) dynamo would hit its
    recompile limit and silently run later rows eager, and after the first shape change it would mark inputs
    dynamic, so rows would be timed with different kinds of graphs."""
    torch._dynamo.reset()
    return torch.compile(module, dynamic=False)


def error_text(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def default_out(kind: str, dev: torch.device, extra: str = "") -> Path:
    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    return Path("results") / "bench" / f"{kind}{extra}-{device_slug(dev)}-{stamp}.json"


def interpret_note(rows: list[dict]) -> str | None:
    if any(r["variant"] in FUSED_VARIANTS and r.get("ms") is not None and r["device"] == "cpu" for r in rows):
        return "Triton variants ran in Triton's CPU interpreter (TRITON_INTERPRET=1): their times are meaningless."
    return None


class RowsFile:
    """A command's JSON document ({..., "rows": [...], "complete": bool}), rewritten atomically after every row, so
    that a command cut off keeps the rows it finished."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.rows = path, header, []
        self.write(complete=False)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        atomic_write_json(self.path, {**self.header, "note": interpret_note(self.rows), "complete": complete,
                                      "rows": self.rows})


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # inf / nan: JSON has no literal for them
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class JsonLines:
    """An append-only JSON-lines file: each record is written, flushed and fsynced the moment it exists."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> dict:
        record = _json_safe(record)
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        return record

    def close(self) -> None:
        self._f.close()

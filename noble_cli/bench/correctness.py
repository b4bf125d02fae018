"""The suite's correctness phase: the fused kernels against float64 (`noble_kernels.testing.check`), with every
autotune config of every kernel forced once, then the full llm-250m shapes with the autotuner's pick.

Compile time is what this phase costs on a fresh machine (every config of every kernel, per element size, is a
Triton compile of seconds; fp32 "ieee" ones up to ~12 s), so it is arranged to compile each config once:
- Forced configs run at one small shape whose sizes specialise like the full shapes' (multiples of 16: Triton
  compiles one binary per config and specialisation, whatever the sizes), so the binaries they compile are the
  ones the full shapes, the micro-timings, the layer table and training load from Triton's on-disk cache.
- Item i forces config min(i, n-1) of every kernel at once: 5 checks per option set and element size compile every
  config, instead of one check per (kernel, config), and no kernel is left to its autotuner (which would compile
  all of its configs at that shape).
- The full shapes run with the autotuner's pick (their compiles are already cached); the ragged shape (sizes that
  are not multiples of 16, i.e. another specialisation) forces config 0 of every kernel instead of compiling all.
- The items run in a pool of worker processes (`--workers`): compiles are CPU work, and a GPU machine has cores to
  spare. A kernel that kills its CUDA context takes down a worker, not the suite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Iterator

import torch

from noble_cli.bench.common import error_text
from noble_cli.layers.implementation import fused_unavailable_reason, import_noble_kernels

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ELEM_BYTES = {"bf16": 2, "fp32": 4}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    m: int  # tokens
    k: int  # in
    n: int  # out
    r: int
    bias: bool = False  # GPT's layers have none

    def describe(self) -> str:
        return f"{self.name} {self.m}x{self.k}->{self.n} r{self.r}" + (" bias" if self.bias else "")


@dataclasses.dataclass(frozen=True)
class Shapes:
    full: tuple[Shape, ...]
    ragged: Shape
    forced: Shape  # where every config is forced: small, specialising like `full`, split-K splitting


FULL = Shapes(
    full=(Shape("qkvo", 16384, 1024, 1024, 64), Shape("fc", 16384, 1024, 4096, 64),
          Shape("fc2", 16384, 4096, 1024, 64)),
    # nothing a multiple of 16, r padded from 40 to 64, with a bias
    ragged=Shape("ragged", 3001, 1000, 1500, 40, bias=True),
    # 4096 tokens: 4 split-K ranges at 1024 -> 1024 on 132 SMs, as q/k/v/o get at 16384
    forced=Shape("forced", 4096, 1024, 1024, 64),
)
# Triton's CPU interpreter (the dry run): 16-wide tiles, sizes that still leave several tiles and tails
TINY = Shapes(
    full=(Shape("qkvo", 64, 32, 48, 8),),
    ragged=Shape("ragged", 37, 40, 24, 5, bias=True),
    # forced configs bring their real tiles into the interpreter: enough tokens for two split-K ranges of them
    forced=Shape("forced", 256, 32, 32, 8),
)


# ---------------------------------------------------------------------------------------------------------------
# Which option sets reach which kernels

FALLBACK_ALTERNATIVES = {"dual_gemm": "one_loop", "dw": "splitk", "partials": "finalize"}


def kernel_requirements(nk) -> dict[str, dict] | None:
    """kernel name -> the option overrides under which `cosnet_linear` launches it, where noble_kernels says so."""
    table = getattr(getattr(nk, "tuning", None), "KERNELS", None)
    if not isinstance(table, dict):
        return None
    try:
        return {name: dict(spec[1]) for name, spec in table.items()}
    except (TypeError, IndexError, ValueError):
        return None


def option_sets(nk) -> list[dict]:
    """Few option sets (overrides of the defaults) under which every kernel launches at least once: the defaults
    first (what training runs), then, greedily, sets of the other kernels' requirements that agree with each
    other. Which kernels really ran is read off the launches afterwards (`coverage`), not assumed from this."""
    requirements = kernel_requirements(nk)
    choices = nk.KernelOptions.choices()
    if requirements is None:
        alt = {k: v for k, v in FALLBACK_ALTERNATIVES.items() if v in choices.get(k, ())}
        return [{}] + ([alt] if alt else [])
    defaults = dataclasses.asdict(nk.KernelOptions())
    remaining = [n for n, req in requirements.items() if any(defaults.get(f) != v for f, v in req.items())]
    sets: list[dict] = [{}]
    while remaining:
        opts: dict = {}
        for name in remaining:
            req = {f: v for f, v in requirements[name].items() if defaults.get(f) != v}
            if all(opts.get(f, v) == v for f, v in req.items()):
                opts.update(req)
        full = {**defaults, **opts}
        reached = [n for n in remaining if all(full.get(f) == v for f, v in requirements[n].items())]
        if not reached:  # requirements naming fields the defaults do not have: stop rather than loop
            break
        remaining = [n for n in remaining if n not in reached]
        sets.append(opts)
    return sets


def reached_by(nk, opts: dict) -> list[str]:
    """The kernels `cosnet_linear` can launch under `opts` (all of them where noble_kernels does not say)."""
    space = nk.autotune_space()
    requirements = kernel_requirements(nk)
    if requirements is None:
        return list(space)
    defaults = dataclasses.asdict(nk.KernelOptions())
    full = {**defaults, **opts}
    return [n for n in space if all(full.get(f) == v for f, v in requirements.get(n, {}).items())]


# ---------------------------------------------------------------------------------------------------------------
# The items

def _item(label: str, shape: Shape, dtype: str, options: dict, forced: dict | None, group: str,
          predicted_s: float) -> dict:
    return {"kind": "check", "item": label, "shape": dataclasses.asdict(shape), "dtype": dtype, "options": options,
            "forced": forced, "group": group, "predicted_s": predicted_s}


def plan_items(shapes: Shapes, tiny: bool, costs: dict) -> list[dict]:
    """Every correctness item, in the order a worker should take them: what training runs first (bf16, default
    options), the alternatives next, fp32 last."""
    nk = import_noble_kernels()
    space = {dt: nk.autotune_space(ELEM_BYTES[dt]) if _takes_elem_bytes(nk) else nk.autotune_space()
             for dt in DTYPES}
    sets = option_sets(nk)

    def forced_items(dt: str, only: list[tuple[int, int]] | None = None) -> list[dict]:
        out = []
        n_max = max(len(configs) for configs in space[dt].values())
        for si, opts in enumerate(sets):
            for i in range(n_max):
                if only is not None and (si, i) not in only:
                    continue
                # every kernel forced, also those these options should not launch: one that launches anyway (a
                # split-K that does not split at a shape falls back to the one-launch kernel) is not autotuned
                forced = {k: min(i, len(configs) - 1) for k, configs in space[dt].items()}
                out.append(_item(f"{dt} every config: set {si} config {i} ({_opts_label(opts)})", shapes.forced, dt,
                                 opts, forced, f"forced-{dt}", costs[f"forced_{dt}"]))
        return out

    def full_items(dt: str, opts: dict) -> list[dict]:
        return [_item(f"{dt} {s.describe()} autotuned ({_opts_label(opts)})", s, dt, opts, None, f"full-{dt}",
                      costs[f"full_{dt}"]) for s in shapes.full]

    def ragged_item(dt: str, opts: dict) -> dict:
        forced = {k: 0 for k in space[dt]}
        return _item(f"{dt} {shapes.ragged.describe()} config 0 ({_opts_label(opts)})", shapes.ragged, dt, opts,
                     forced, f"ragged-{dt}", costs[f"ragged_{dt}"])

    selfcheck = {"kind": "selfcheck", "item": "noble train's self-check, llm-250m shapes, bf16-mixed",
                 "shapes": [dataclasses.asdict(s) for s in shapes.full], "group": "selfcheck",
                 "predicted_s": costs["selfcheck"]}
    if tiny:  # the dry run: one item of each kind (the interpreter takes a second or more per check)
        items = forced_items("bf16", [(0, 4), (len(sets) - 1, 0)]) + full_items("bf16", {}) + [selfcheck]
        items += [ragged_item("bf16", {})] + forced_items("fp32", [(0, 0)])
    else:
        items = forced_items("bf16") + full_items("bf16", {}) + [selfcheck, ragged_item("bf16", {})]
        for opts in sets[1:]:
            items += full_items("bf16", opts) + [ragged_item("bf16", opts)]
        items += forced_items("fp32") + full_items("fp32", {}) + [ragged_item("fp32", {})]
    for i, it in enumerate(items):
        it["id"] = i
    return items


def _takes_elem_bytes(nk) -> bool:
    import inspect

    try:
        return "elem_bytes" in inspect.signature(nk.autotune_space).parameters
    except (TypeError, ValueError):
        return False


def _opts_label(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "default options"


# ---------------------------------------------------------------------------------------------------------------
# Running one item (in a worker process, or in the suite's own)

def run_item(item: dict, device: str) -> dict:
    """One correctness item -> its JSON record (never raises)."""
    t0 = time.perf_counter()
    rec = {"phase": "correctness", "item": item["item"], "group": item["group"], "predicted_s": item["predicted_s"],
           "pid": os.getpid()}
    try:
        why = fused_unavailable_reason(device)
        if why:
            rec.update(status="skipped", reason=why)
        elif item["kind"] == "selfcheck":
            rec.update(_selfcheck(item, device))
        else:
            rec.update(_check(item, device))
    except Exception as e:  # a record, not a crash: the other items still run
        rec.update(status="error", error=error_text(e), traceback=traceback.format_exc()[-3000:])
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def _selfcheck(item: dict, device: str) -> dict:
    from noble_cli.layers import selfcheck

    shapes = [selfcheck.LayerShape(s["k"], s["n"], s["r"], s["bias"]) for s in item["shapes"]]
    selfcheck.clear_cache()
    verdict = selfcheck.self_check(shapes, device, "bf16-mixed")
    return {"status": "ok" if verdict.ok else "fail", **verdict.summary()}


def _check(item: dict, device: str) -> dict:
    nk = import_noble_kernels()
    testing = nk.testing
    s = item["shape"]
    with contextlib.ExitStack() as stack:
        for kernel, index in (item["forced"] or {}).items():
            stack.enter_context(nk.forced_config(kernel, index))
        res = testing.check(s["m"], s["k"], s["n"], s["r"], DTYPES[item["dtype"]], device, bias=s["bias"], seed=0,
                            options=item["options"] or None)
    launches = []
    for launch in res.pop("kernels", []):
        if launch not in launches:
            launches.append(launch)
    out = {**res, "status": "ok" if res.get("ok") else "fail", "forced": item["forced"], "launches": launches}
    out["shape"] = s["name"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Coverage: which config of which kernel ran

def coverage(nk, records: list[dict]) -> dict:
    """Per element size: kernel -> config indices that ran in some passing check, and those that never ran."""
    out = {}
    for dt in DTYPES:
        space = nk.autotune_space(ELEM_BYTES[dt]) if _takes_elem_bytes(nk) else nk.autotune_space()
        ran: dict[str, set] = {k: set() for k in space}
        for rec in records:
            if rec.get("dtype") != str(DTYPES[dt]).replace("torch.", "") or rec.get("status") != "ok":
                continue
            for launch in rec.get("launches", []):
                configs = space.get(launch.get("kernel"), [])
                cfg = launch.get("config")
                if cfg in configs:
                    ran[launch["kernel"]].add(configs.index(cfg))
        out[dt] = {"covered": {k: sorted(v) for k, v in ran.items()},
                   "missing": {k: [i for i in range(len(space[k])) if i not in ran[k]] for k in space
                               if len(ran[k]) < len(space[k])}}
    return out


# ---------------------------------------------------------------------------------------------------------------
# The worker pool

def _worker(tasks, results, device: str) -> None:
    # each worker imports noble_kernels itself (spawned, not forked: CUDA does not survive a fork)
    while True:
        got = tasks.get()
        if got is None:
            return
        results.put(("start", got["id"], os.getpid()))
        rec = run_item(got, device)
        results.put(("done", got["id"], rec))
        if rec.get("status") == "error" and "CUDA" in str(rec.get("error")) and "error" in str(rec.get("error")):
            return  # a CUDA error poisons this process's context: leave the rest to the other workers


class Pool:
    """`workers` spawned processes taking items in order; results come back as they finish. workers=0 runs the
    items in this process instead, one at a time, when `results()` asks for them. A worker that dies (a kernel
    that crashed the process) turns its item into an error record; when none is left, the rest run here."""

    def __init__(self, workers: int, device: str):
        self.workers, self.device = workers, device
        self.pending: dict[int, dict] = {}  # submitted, no record yet
        self.started: dict[int, int] = {}  # item id -> pid of the worker running it
        self._local: list[dict] = []
        self.procs = []
        self.ran_any = False  # a worker has started an item
        self.dead: str | None = None  # why the items left will not run
        if workers:
            ctx = mp.get_context("spawn")
            self.tasks, self.queue = ctx.Queue(), ctx.Queue()
            self.procs = [ctx.Process(target=_worker, args=(self.tasks, self.queue, device), daemon=True)
                          for _ in range(workers)]
            for p in self.procs:
                p.start()

    def submit(self, items: list[dict]) -> None:
        for it in items:
            self.pending[it["id"]] = it
            if self.procs:
                self.tasks.put(it)
            else:
                self._local.append(it)

    def _crashed(self) -> Iterator[dict]:
        """Records for the items whose worker died under them; when every worker is gone, the items none took
        move to this process."""
        dead = {p.pid: p.exitcode for p in self.procs if not p.is_alive()}
        for item_id, pid in list(self.started.items()):
            if pid in dead and item_id in self.pending:
                it = self.pending.pop(item_id)
                del self.started[item_id]
                yield {"phase": "correctness", "item": it["item"], "group": it["group"],
                       "predicted_s": it["predicted_s"], "status": "error",
                       "error": f"worker process {pid} died (exit code {dead[pid]}) while running this item"}
        if self.procs and len(dead) == len(self.procs):
            self.procs = []
            if self.ran_any:
                # they died running items (kernels that crash a process): running the rest here would take the
                # suite down with them
                self.dead = f"every worker process died (exit codes {sorted(set(dead.values()))})"
            else:  # they never got going (an import failure, say): the items run here instead
                self._local = [it for _, it in sorted(self.pending.items())]

    def results(self, deadline: float, ids: set[int] | None = None) -> Iterator[dict]:
        """Records of finished items (those in `ids`, or all) until they are all done or `deadline` (monotonic)
        passes; records of other items that finish meanwhile come too."""
        ids = set(self.pending) if ids is None else set(ids)
        while ids & set(self.pending):
            if self.dead:
                return
            if not self.procs:
                nxt = next((it for it in self._local if it["id"] in ids), None)
                if nxt is None or time.monotonic() + nxt["predicted_s"] > deadline:
                    return
                self._local.remove(nxt)
                del self.pending[nxt["id"]]
                yield run_item(nxt, self.device)
                continue
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                return
            try:
                kind, item_id, payload = self.queue.get(timeout=min(timeout, 2.0))
            except queue.Empty:
                yield from self._crashed()
                continue
            if kind == "start":
                self.started[item_id] = payload
                self.ran_any = True
            elif item_id in self.pending:
                del self.pending[item_id]
                self.started.pop(item_id, None)
                yield payload

    def close(self, reason: str) -> list[dict]:
        """Stops the workers (those still busy are terminated) and returns a record for every item that did not
        finish: cut while running, or never started."""
        left = []
        if self.procs:
            for _ in self.procs:
                self.tasks.put(None)
            # collect what finishes meanwhile, then give busy workers a moment to exit before terminating them
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(p.is_alive() for p in self.procs):
                try:
                    kind, item_id, payload = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "done" and item_id in self.pending:
                    del self.pending[item_id]
                    self.started.pop(item_id, None)
                    left.append(payload)
                elif kind == "start":
                    self.started[item_id] = payload
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=5)
        for item_id, it in sorted(self.pending.items()):
            running = item_id in self.started
            left.append({"phase": "correctness", "item": it["item"], "group": it["group"],
                         "predicted_s": it["predicted_s"], "status": "cut" if running else "skipped",
                         "reason": (f"still running when {reason}" if running else self.dead or reason)})
        self.pending.clear()
        return left

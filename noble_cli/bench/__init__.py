"""`noble bench`: how much a NOBLE branch costs, and whether the fused kernels are right, on this machine.

    noble bench layer                       one augmented linear at the llm-250m shapes, forward + backward
    noble bench step --recipe llm-250m      a whole training step (forward, backward, clip, AdamW) of a recipe
    noble bench suite --out DIR             the whole GPU verdict in one command, streamed, within a budget

Variants: `baseline` (plain nn.Linear / the recipe without branches), `noble-torch` (NobleLinear's torch path),
`noble-triton` (the fused kernels of noble_kernels), `noble-triton-cublas` (fused r-wide kernels, cuBLAS for the
full-width GEMMs). Times are medians over timed iterations after warm-up (CUDA events on a GPU, wall clock on a
CPU). On a CPU the Triton variants run only under TRITON_INTERPRET=1, where their times mean nothing: the CPU mode
exists to check that the commands work end to end. Nothing here asserts speed.
"""

from __future__ import annotations

import typer

from noble_cli.bench import layer as _layer, step as _step, suite as _suite
from noble_cli.bench.common import VARIANTS, time_ms, triton_skip_reason
from noble_cli.bench.layer import branch_flops_ratio
from noble_cli.layers.implementation import import_noble_kernels

bench_app = typer.Typer(
    help="Time NOBLE against its baseline: one layer (`layer`), a whole training step (`step`), or the whole GPU "
         "verdict (`suite`).",
    no_args_is_help=True,
)
# (the command functions are not bound here under their modules' names, which they would shadow)
bench_app.command(name="layer")(_layer.layer)
bench_app.command(name="step")(_step.step)
bench_app.command(name="suite")(_suite.suite)

__all__ = ["VARIANTS", "bench_app", "branch_flops_ratio", "import_noble_kernels", "time_ms", "triton_skip_reason"]

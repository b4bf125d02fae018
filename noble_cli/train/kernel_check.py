"""`noble train`'s self-check of the fused kernels, before the first step (noble_cli/layers/implementation.py).

A run whose layers plan the fused path (a CosNet branch with `noble.kernel` auto on CUDA, or triton) checks it on
every distinct layer shape of the model, under the run's precision, on every process. All processes then agree
through the strategy (an all-reduce of the pass flag), so a DDP or FSDP run never mixes implementations:
- auto: a failure anywhere prints one warning naming the shape and the error, and every NOBLE layer of the model
  runs the torch path. All of them, not only the failing shape's: the check samples a few hundred tokens, while
  training shapes run other launch configurations of the same kernels, so a failure in one shape makes the others
  suspect too; and one implementation per run keeps meta.json's `kernel` and the run's step times meaningful.
- triton (asked for explicitly): a failure is a one-line error (exit 2), not a fallback.
The verdict goes to meta.json (`kernel`, `kernel_reason`, `kernel_check`), written by global rank 0.
"""

from __future__ import annotations

import lightning as L
from rich.console import Console
from rich.markup import escape

from noble_cli.errors import NobleError
from noble_cli.layers import noble_layers, set_kernel
from noble_cli.layers.implementation import Choice
from noble_cli.layers.selfcheck import layer_shapes, self_check
from noble_cli.train.run_folder import RunFolder


class KernelSelfCheck(L.Callback):
    """Runs the self-check in `on_fit_start` (the model is on its device, the process group is up) and records
    the implementation that runs in the run folder's meta.json."""

    def __init__(self, folder: RunFolder):
        self.folder = folder

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        choice: Choice = pl_module.implementation
        check = None
        if choice.pending:
            verdict = self_check(layer_shapes(pl_module.model), pl_module.device, str(trainer.precision))
            # every process must land on the same implementation: one failure anywhere fails them all
            passed = trainer.strategy.reduce_boolean_decision(verdict.ok, all=True)
            check = verdict.summary()
            where = "on the CUDA device" if pl_module.device.type == "cuda" else "in Triton's CPU interpreter"
            if passed:
                choice = Choice(choice.requested, "triton",
                                f"fused kernels: passed their self-check {where} ({len(verdict.checks)} layer "
                                f"shape(s), {verdict.seconds:.1f} s)")
            else:
                failure = verdict.failure
                what = failure.describe() if failure else "it failed in another process of this run"
                if choice.requested == "triton":
                    if trainer.is_global_zero:
                        self._record(Choice("triton", "triton", f"stopped: the fused kernels failed their "
                                                                  f"self-check at {what}"), check)
                    raise NobleError(f"noble.kernel is triton, but the fused kernels failed their self-check at "
                                     f"{what}; use --kernel torch (or auto, which falls back to it)")
                choice = Choice(choice.requested, "torch",
                                f"the fused kernels failed their self-check at {what}: torch path")
                set_kernel(pl_module.model, "torch")
                if trainer.is_global_zero:
                    Console(stderr=True).print(
                        f"[yellow]warning:[/] the fused Triton kernels failed their self-check at {escape(what)}; "
                        f"all {len(noble_layers(pl_module.model))} NOBLE layers run the torch path "
                        "(meta.json: kernel_reason)", highlight=False, soft_wrap=True)
            pl_module.implementation = choice
        if trainer.is_global_zero:
            self._record(choice, check)

    def _record(self, choice: Choice, check: dict | None) -> None:
        """The implementation of this start into meta.json (a resume re-checks and records its own verdict)."""
        meta = self.folder.read_json(self.folder.meta_path)
        if not meta:
            return
        update = {**choice.meta(), **({"kernel_check": check} if check else {})}
        if any(meta.get(k) != v for k, v in update.items()):
            self.folder.update_meta(update)

"""A run's FLOPs per step, for meta.json and the report: Lightning's `measure_flops` on a meta-device copy of the
model, fed the shapes of the run's first batch. Nothing here may stop or change a run: a count that cannot be made
is recorded as null."""

from __future__ import annotations

import inspect
import types

import lightning as L
import torch

from noble_cli.atomic import atomic_write_json
from noble_cli.tasks.base import build_model
from noble_cli.train.run_folder import RunFolder


class _WithModel:
    """The task's own methods (its `loss`, properties, helpers), run against another model: the meta-device copy.
    The real module is never touched (it may be compiled or sharded by FSDP)."""

    def __init__(self, module, model):
        self.__dict__.update(_module=module, model=model)

    def __getattr__(self, name):
        attr = inspect.getattr_static(type(self._module), name, None)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        if isinstance(attr, property):
            return attr.fget(self)
        return getattr(self._module, name)


def micro_batch_flops(module, batch) -> tuple[int | None, int]:
    """(FLOPs of one micro-batch's forward and backward through the task's training loss, items in the batch).

    Counted by Lightning's `measure_flops` on a meta-device copy of the model and the batch: no memory and no time
    on the device, and the same count for the fused Triton path (it does the same matmuls). Torch's FlopCounterMode
    counts matmuls, convolutions and attention only, so elementwise work (CosNet's cosines, norms) is not in it: the
    figure is the FLOP floor. None where the loss cannot run on the meta device (shapes that depend on the data)."""
    from lightning.fabric.utilities.throughput import measure_flops
    from torch.utils._pytree import tree_map

    try:
        items = int(module.items_in(batch))
    except Exception:  # noqa: BLE001 - a count for the report, never a reason to stop a run
        items = 0
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(module.make_model, module.model_cfg, module.cfg.noble)
            on_meta = tree_map(lambda t: torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t,
                               batch)
            proxy = _WithModel(module, model)
            flops = measure_flops(model, lambda: type(module).loss(proxy, on_meta)[0], lambda loss: loss)
    except Exception:  # noqa: BLE001
        return None, items
    return int(flops), items


class FlopsProbe(L.Callback):
    """Adds the run's FLOPs to meta.json from its first batch: `flops_per_step` (an optimizer step on all devices:
    micro-batch x accumulation x world size), `flops_per_item` and `flops_item` (tokens, images). Older folders,
    and tasks whose loss cannot be counted, have none (or null): the report shows "-"."""

    def __init__(self, folder: RunFolder):
        self.folder, self.pending = folder, True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.pending:
            return
        self.pending = False
        meta = self.folder.read_json(self.folder.meta_path)
        if not trainer.is_global_zero or not meta or "flops_per_step" in meta:
            return
        flops, items = micro_batch_flops(pl_module, batch)
        steps = trainer.accumulate_grad_batches * trainer.world_size
        meta["flops_per_step"] = None if flops is None else flops * steps
        meta["flops_per_item"] = flops / items if flops is not None and items else None
        meta["flops_item"] = getattr(pl_module, "items_name", "items")
        atomic_write_json(self.folder.meta_path, meta)

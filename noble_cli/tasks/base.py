"""What every task shares: building the model with (or without) NOBLE, the optimizer, the schedule and logging.

A task subclasses `NobleTask` and writes three things: `make_model(model_cfg)` (a plain PyTorch model with
nn.Linear layers), `loss(batch)` (training loss and extra logs) and `evaluate(batch)` (a dict of eval metrics, with
`loss`). The branch is never special-cased in a task: it is put in by `build_model`, from the `noble:` section.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import lightning as L
import torch
from torch import nn

from noble_cli.config import NobleConfig, RunConfig
from noble_cli.data.position import micro_batches_done
from noble_cli.errors import NobleError
from noble_cli.layers import LRMultipliers, apply_noble, count_parameters, param_groups
from noble_cli.layers.apply import reinit_main_weights
from noble_cli.layers.implementation import Choice, plan
from noble_cli.seeding import STEP, derive_seed
from noble_cli.tasks.optimizers import build_optimizer


def planned_implementation(noble: NobleConfig, on_cuda: bool) -> Choice:
    """The branch implementation a run starts with (noble_cli/layers/implementation.py decides: a CosNet branch
    with `noble.kernel` triton, or auto on CUDA, plans the fused kernels, pending their self-check before the first
    step; everything else runs torch)."""
    return plan(noble.branch, noble.kernel, "cuda" if on_cuda else "cpu")


def _with_branches(make: Callable, model_cfg, noble: NobleConfig, branch: str, kernel: str = "torch") -> nn.Module:
    model = make(model_cfg)
    apply_noble(
        model, rank=noble.rank, activation=branch, targets=noble.targets, up_init_scale=noble.up_init_scale,
        kernel=kernel, reinit_main=noble.main_init_scale,
    )
    return model


class WidensMLP(Protocol):
    """What the dense-matched control needs of a task's model config: the MLP's hidden width, and the same config
    with another width. The built-in models have it from `TransformerConfig`; the transformers-backed task
    (`HFCausalLMConfig`) through `intermediate_size`."""

    @property
    def mlp_hidden(self) -> int: ...

    def with_mlp_hidden(self, width: int) -> WidensMLP: ...


def dense_matched_config(make: Callable, model_cfg: WidensMLP, noble: NobleConfig) -> WidensMLP:
    """The model config widened (MLP hidden size) until it has as many parameters as the NOBLE model.

    Parameter counts are affine in the MLP hidden size, so two counts on the meta device give the exact width.
    """
    if not callable(getattr(type(model_cfg), "with_mlp_hidden", None)):
        raise NobleError(f"the dense-matched control cannot widen a {type(model_cfg).__name__}: a model config "
                         "needs mlp_hidden and with_mlp_hidden (WidensMLP in noble_cli/tasks/base.py)")
    h0, widened = model_cfg.mlp_hidden, model_cfg.with_mlp_hidden
    with torch.device("meta"):
        target = count_parameters(_with_branches(make, model_cfg, noble, noble.match_branch)).total
        p0 = count_parameters(make(model_cfg)).total
        p1 = count_parameters(make(widened(h0 + 64))).total
    per_unit = (p1 - p0) / 64
    hidden = h0 + max(0, round((target - p0) / per_unit))
    return widened(hidden)


def build_model(make: Callable, model_cfg, noble: NobleConfig, kernel: str = "torch") -> nn.Module:
    """The task's model, with NOBLE branches or, for the dense-matched baseline, widened instead; for the
    init-only control, the plain model with NOBLE's main-weight re-init on the targeted layers."""
    if noble.enabled:
        return _with_branches(make, model_cfg, noble, noble.branch, kernel)
    if noble.dense_match:
        model_cfg = dense_matched_config(make, model_cfg, noble)
    model = make(model_cfg)
    if noble.init_only:
        reinit_main_weights(model, noble.targets, noble.main_init_scale)
    return model


def lr_factor(step: int, max_steps: int, warmup: int, decay: str, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine / linear decay to `min_ratio` at max_steps (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    if decay == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class NobleTask(L.LightningModule):
    """Base LightningModule: model with branches, AdamW with NOBLE's groups (or Muon+AdamW), warm-up + cosine,
    logging."""

    items_name = "tokens"  # what a batch is counted in for throughput (tokens, images)

    def __init__(self, cfg: RunConfig):
        super().__init__()
        # The resolved config goes into every checkpoint (hyper_parameters), so a checkpoint alone can be rebuilt.
        self.save_hyperparameters({"config": cfg.to_dict()})
        self.cfg, self.model_cfg, self.data_cfg = cfg, cfg.model, cfg.data
        # what the layers run; noble_cli/train/kernel_check.py replaces it with the self-check's verdict
        self.implementation = planned_implementation(cfg.noble, on_cuda=cfg.trainer.uses_cuda())
        self.model = build_model(self.make_model, self.model_cfg, cfg.noble, self.implementation.kernel)
        self.params = count_parameters(self.model)

    # --- what a task writes -------------------------------------------------------------------------------------
    def make_model(self, model_cfg) -> nn.Module:
        raise NotImplementedError

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self, batch) -> dict[str, torch.Tensor]:
        """Eval metrics of one batch; must contain `loss`. Averaged over the fixed eval batches."""
        loss, _ = self.loss(batch)
        return {"loss": loss}

    def items_in(self, batch) -> int:
        return 0

    def configure_model(self) -> None:
        """Activation checkpointing: a model that supports it has a bool `activation_checkpointing` (the built-in
        ones, through models/transformer.py `run_blocks`); a task whose model checkpoints another way overrides
        this (hf_causal_lm). Asked of a model without it, the run stops here rather than silently keep every
        activation."""
        t = self.cfg.trainer
        # Under FSDP, Lightning checkpoints each block itself (train/run.py): the model must not do it a second time.
        wanted = t.activation_checkpointing and t.strategy != "fsdp"
        if hasattr(self.model, "activation_checkpointing"):
            self.model.activation_checkpointing = wanted
        elif wanted:
            raise NobleError(f"trainer.activation_checkpointing: the {self.cfg.task} task's model "
                             f"({type(self.model).__name__}) does not support it; valid: false, or "
                             "trainer.strategy=fsdp (Lightning checkpoints the blocks)")

    def block_types(self) -> set[type]:
        """The transformer block classes (those holding a SelfAttention): what FSDP wraps and shards one by one,
        and what its activation checkpointing recomputes."""
        from noble_cli.models.transformer import SelfAttention

        return {type(m) for m in self.model.modules() if any(isinstance(c, SelfAttention) for c in m.children())}

    def data_identity(self) -> dict:
        """What the run's data depends on beyond its config (e.g. the VQGAN checkpoint behind image codes). It
        goes into meta.json and `pair_key`, and a resume into a folder whose data identity differs is refused."""
        return {}

    def flops_per_item(self) -> float | None:
        """Training FLOPs per counted item, for MFU; None where not worked out."""
        return None

    # --- shared Lightning plumbing ------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        # The randomness inside a step (dropout, drop-path, VQGAN code restarts) is a pure function of the seed, the
        # micro-batch and the rank: Lightning's checkpoints carry no RNG state, and seed_everything at start-up would
        # make a resumed run replay step 1's draws instead of drawing what the uninterrupted run drew.
        t = self.trainer
        micro = micro_batches_done(t) + batch_idx % t.accumulate_grad_batches
        torch.manual_seed(derive_seed(self.cfg.seed, STEP, micro, t.global_rank))

    def training_step(self, batch, batch_idx):
        loss, logs = self.loss(batch)
        self.log("train_loss", loss.detach(), prog_bar=True)
        for k, v in logs.items():
            self.log(f"train_{k}", v)
        return loss

    def validation_step(self, batch, batch_idx):
        metrics = self.evaluate(batch)
        self.log_dict({f"eval_{k}": v for k, v in metrics.items()}, on_epoch=True, sync_dist=True,
                      prog_bar=False)

    def optimizer_and_schedule(self):
        """AdamW over NOBLE's parameter groups (no decay on what `model.no_weight_decay()` lists, if it has one),
        or Muon on the blocks' matrices with AdamW for the rest (`optim.name`, tasks/optimizers.py), and the
        warm-up + decay schedule over every group, stepped every optimizer step."""
        o, s, t = self.cfg.optim, self.cfg.schedule, self.cfg.trainer
        n = self.cfg.noble
        mults = LRMultipliers(n.up_lr_power, n.mix_lr_power, n.freq_lr_mult, n.phase_lr_mult)
        no_decay = getattr(self.model, "no_weight_decay", lambda: ())()
        groups = param_groups(self.model, o.lr, o.weight_decay, mults, no_decay)
        opt = build_optimizer(self.model, o, groups, fused=self.device.type == "cuda")
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, t.max_steps, s.warmup_steps, s.decay, s.min_lr_ratio)
        )
        return opt, sched

    def configure_optimizers(self):
        opt, sched = self.optimizer_and_schedule()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

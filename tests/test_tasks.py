"""The task contract (noble_cli/tasks/spec.py), enforced for every registered task: its typed configs, a recipe,
a module that builds with a NOBLE branch, a synthetic batch that trains one step and evaluates, and its metric."""

import math

import lightning as L
import pytest
import torch

from noble_cli import recipes
from noble_cli.config import ConfigModel
from noble_cli.layers import noble_layers
from noble_cli.tasks import TASKS, Task, get_task, register, train_flags
from noble_cli.tasks.base import NobleTask
from noble_cli.tasks.optimizers import MuonWithAdamW


class Batches:
    """A data loader of fixed batches (Lightning would read a bare list as several loaders)."""

    def __init__(self, *batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def smallest_recipe(task: str) -> str:
    """The task's CPU-sized recipe (every task must have at least one recipe): `*-tiny`, else `*-bytes`."""
    names = [n for n in recipes.list_recipes() if recipes.load_recipe(n).get("task") == task]
    assert names, f"task {task} has no recipe"
    return next((n for suffix in ("-tiny", "-bytes") for n in names if n.endswith(suffix)), names[0])


def one_step(name: str, overrides: dict | None = None):
    """The task's smallest recipe with a CosNet branch, one training step and one evaluation on synthetic batches:
    (task, module, trainer, the parameters before the step)."""
    task = get_task(name)
    cfg = recipes.resolve(smallest_recipe(name), {"noble.branch": "cosnet", "noble.rank": 2, "trainer.batch_size": 2,
                                                  **(overrides or {})})
    torch.manual_seed(0)
    module = task.build_module(cfg)
    gen = torch.Generator().manual_seed(0)
    batch, items = task.synthetic_batch(module, 2, gen)
    assert items > 0 and module.items_in(batch) == items
    eval_batch, _ = task.synthetic_batch(module, 2, gen)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, val_check_interval=1)
    trainer.fit(module, train_dataloaders=Batches(batch), val_dataloaders=Batches(eval_batch))
    return task, module, trainer, before


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_trains_a_step_and_evaluates(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    assert issubclass(task.model_class, ConfigModel) and issubclass(task.data_class, ConfigModel)
    task, module, trainer, before = one_step(name)
    cfg = module.cfg
    assert isinstance(cfg.model, task.model_class) and isinstance(cfg.data, task.data_class)
    assert task.data_summary(cfg).strip()
    assert isinstance(module, NobleTask) and noble_layers(module.model), "the NOBLE layer library put branches in"
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train_loss"]))
    assert task.metric.name in metrics and math.isfinite(float(metrics[task.metric.name]))
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert any(".up." in n for n in moved), "one optimizer step moved the branches' up-projections"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_steps_muon_and_adamw_together(name):
    """optim.name=muon in every task, the VQGAN's manual optimization included: one optimizer object steps Muon
    on the blocks' matrices and AdamW on the rest (the branches among them), and both move their parameters."""
    _, module, trainer, before = one_step(name, {"optim.name": "muon"})
    opt = trainer.optimizers[0]
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in module.model.named_parameters()}
    on_muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    on_adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    assert on_muon and not set(on_muon) & set(on_adamw)
    assert set(on_muon) | set(on_adamw) == set(before), "every trainable parameter has one optimizer"
    assert not [n for n in on_muon if any(part in n for part in (".down.", ".up.", ".act."))], "branches: AdamW"
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert set(on_muon) <= moved and any(".up." in n for n in moved)


def test_every_task_option_sets_a_field_of_its_tasks_data_or_model():
    for option, (flag, tasks) in train_flags().items():
        for name in tasks:
            section, field = flag.key.split(".")
            cls = getattr(get_task(name), f"{section}_class")
            assert field in cls.model_fields, (option, name)


def test_a_second_task_under_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'causal_lm' is already registered"):
        register("causal_lm", "somewhere.else", "a copy")
    assert TASKS["causal_lm"].module_path == "noble_cli.tasks.causal_lm"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_activation_checkpointing_recomputes_blocks_and_changes_no_gradient(name, monkeypatch):
    """trainer.activation_checkpointing in every task: the model's blocks run under torch's checkpoint (or, for a
    transformers model, its own gradient checkpointing), and loss and gradients equal the run without it."""
    import noble_cli.models.transformer as transformer
    from noble_cli.tasks.hf_causal_lm import hf_checkpointing

    calls = []
    real = transformer.checkpoint
    monkeypatch.setattr(transformer, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = get_task(name)
    results = []
    for on in (False, True):
        cfg = recipes.resolve(smallest_recipe(name), {"noble.branch": "cosnet", "noble.rank": 2,
                                                      "trainer.activation_checkpointing": on})
        torch.manual_seed(0)
        module = task.build_module(cfg)
        module.configure_model()
        module.train()
        batch, _ = task.synthetic_batch(module, 2, torch.Generator().manual_seed(0))
        torch.manual_seed(1)
        loss, _ = module.loss(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}))
        checkpointed = bool(calls) or (name == "hf_causal_lm" and hf_checkpointing(module.model))
        assert checkpointed == on, f"{name}: activation_checkpointing={on} but checkpointed={checkpointed}"
    (loss0, g0), (loss1, g1) = results
    torch.testing.assert_close(loss1, loss0)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_summary_names_its_metric_and_its_best_value_is_read_back_through_it():
    """summary.json's best value is keyed by the task's metric; the CLI and sweep tables read it back through
    Metric.from_summary, and a summary from before the metric was recorded is eval_loss's."""
    import pandas as pd

    from noble_cli.tasks.spec import Metric
    from noble_cli.train.recorder import run_summary

    metrics = pd.DataFrame({"step": [1, 2, 3], "wallclock_s": [0.1, 0.2, 0.3], "step_time_s": [0.1] * 3,
                            "eval_top1": [0.5, 0.7, 0.6]})
    summary = run_summary(metrics, 0, "completed", Metric("eval_top1", "max"))
    back = Metric.from_summary(summary)
    assert back == Metric("eval_top1", "max") and back.best_in(summary) == pytest.approx(0.7)
    assert summary["best_step"] == 2
    assert Metric.from_summary({"best_eval_loss": 2.5}).best_in({"best_eval_loss": 2.5}) == 2.5

"""The task registry: every task noble can train, by name (the contract a task fulfils: `noble_cli.tasks.spec`).

Adding a task: its module (a `Task` subclass and an instance named `TASK`), its recipe(s), and one `register(...)`
line below. Task modules are imported on first use, so that the command line and the tests of one task stay fast;
the `noble train` options a task adds are declared here for the same reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from noble_cli.errors import choices_error
from noble_cli.tasks.spec import Metric, Task, TrainFlag

__all__ = ["TASKS", "Metric", "Task", "TaskEntry", "TrainFlag", "get_task", "register", "train_flags"]


@dataclass(frozen=True)
class TaskEntry:
    name: str
    module_path: str
    description: str
    flags: tuple[TrainFlag, ...] = ()

    def load(self) -> Task:
        task = importlib.import_module(self.module_path).TASK
        if not isinstance(task, Task) or task.name != self.name:
            raise TypeError(f"{self.module_path}.TASK must be the Task named {self.name!r}, got {task!r}")
        return task


TASKS: dict[str, TaskEntry] = {}


def register(name: str, module_path: str, description: str, flags: tuple[TrainFlag, ...] = ()) -> None:
    """Add a task. A name already taken is refused: a second `causal_lm` would silently change every recipe of it."""
    if name in TASKS:
        raise ValueError(f"task {name!r} is already registered (by {TASKS[name].module_path})")
    TASKS[name] = TaskEntry(name, module_path, description, tuple(flags))


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise choices_error("task", name, list(TASKS))
    return TASKS[name].load()


def train_flags() -> dict[str, tuple[TrainFlag, list[str]]]:
    """Every task-specific `noble train` option: name -> (the flag, the tasks that take it)."""
    out: dict[str, tuple[TrainFlag, list[str]]] = {}
    for entry in TASKS.values():
        for flag in entry.flags:
            known = out.setdefault(flag.name, (flag, []))
            if known[0] != flag:
                raise ValueError(f"tasks {known[1]} and {entry.name!r} declare the flag --{flag.name} differently")
            known[1].append(entry.name)
    return out


# DeiT-style augmentation switches of the image classifier.
AUGMENTATION_FLAGS = (
    TrainFlag("mixup", "data.mixup", bool, "Vision: Mixup on or off."),
    TrainFlag("cutmix", "data.cutmix", bool, "Vision: CutMix on or off."),
    TrainFlag("mixup_alpha", "data.mixup_alpha", float, "Vision: Mixup alpha."),
    TrainFlag("cutmix_alpha", "data.cutmix_alpha", float, "Vision: CutMix alpha."),
    TrainFlag("randaugment", "data.randaugment", bool, "Vision: RandAugment on or off."),
    TrainFlag("random_erasing", "data.random_erasing", float, "Vision: random-erasing probability (0: off)."),
    TrainFlag("label_smoothing", "data.label_smoothing", float, "Vision: label smoothing."),
)

register("causal_lm", "noble_cli.tasks.causal_lm", "GPT causal language modelling")
register("hf_causal_lm", "noble_cli.tasks.hf_causal_lm", "causal language modelling with a transformers model")
register("masked_lm", "noble_cli.tasks.masked_lm", "BERT masked language modelling")
register("vit", "noble_cli.tasks.vit", "ViT image classification", AUGMENTATION_FLAGS)
register("vqgan", "noble_cli.tasks.vqgan", "transformer VQGAN image tokenizer")
register("image_lm", "noble_cli.tasks.image_lm", "autoregressive modelling of VQGAN image tokens")

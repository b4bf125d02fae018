"""The task contract: what every task provides, written as code (`Task`) and enforced by tests/test_tasks.py.

A task is one module holding a `Task` subclass and an instance of it named `TASK`, plus its recipe(s) and one
`register(...)` line in `noble_cli/tasks/__init__.py`. Everything else (training, sweeps, reports, bench, the
command line) reads what it needs from the task object, never from the task's name:

- `model_class`, `data_class`: the typed configs of a recipe's `model:` and `data:` sections (pydantic models, see
  noble_cli/config.py); field constraints there, cross-field checks in `check`;
- `build_module` (a `NobleTask` LightningModule: the model with its NOBLE branches, the loss, the evaluation) and
  `build_datamodule`;
- `synthetic_batch`: a batch of the right shapes for `noble bench` (a step's cost does not depend on the data);
- `metric`: what its runs are judged by (checkpoints, summaries, reports, plots, sweep progress);
- `data_summary`: one line on the data, for `noble recipes`.
The `noble train` options a task adds (e.g. the vision augmentation switches) are declared in its registry line, so
the command line is built without importing any task.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from noble_cli.config import ConfigModel, RunConfig

if TYPE_CHECKING:
    import lightning as L
    import torch

    from noble_cli.data.text_tokenizers import TextTokenizer
    from noble_cli.tasks.base import NobleTask


@dataclass(frozen=True)
class Metric:
    """What a task's runs are judged by: an evaluation column of metrics.csv, and whether lower or higher is better.
    The report's target is the baseline's best value of it; steps-to-target is the first step at least as good."""

    name: str = "eval_loss"
    mode: Literal["min", "max"] = "min"

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"Metric.mode must be min or max, got {self.mode!r}")

    def better(self, a: float, b: float) -> bool:
        """Whether `a` is strictly better than `b` (NaN is never better)."""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a < b if self.mode == "min" else a > b)

    def as_lower_is_better(self, value: float) -> float:
        """The value on a scale where lower is better (what the report's arithmetic works on)."""
        return value if self.mode == "min" else -value

    @property
    def best_key(self) -> str:
        """summary.json's key of the run's best value of this metric."""
        return f"best_{self.name}"

    @property
    def final_key(self) -> str:
        return f"final_{self.name}"

    def to_meta(self) -> dict:
        return {"name": self.name, "mode": self.mode}

    @classmethod
    def from_summary(cls, summary: dict | None) -> Metric:
        """The metric a summary.json was written for (summaries from before it was recorded: eval_loss)."""
        s = summary if isinstance(summary, dict) else {}
        name, mode = s.get("metric"), s.get("metric_mode")
        return cls(str(name), mode if mode in ("min", "max") else "min") if name else cls()

    def best_in(self, summary: dict | None):
        """The best value a summary.json records for this metric (None if none)."""
        return (summary or {}).get(self.best_key)

    @classmethod
    def from_meta(cls, meta: dict | None) -> Metric:
        """A run folder's metric (meta.json); folders from before it was recorded were judged by eval_loss."""
        return cls(**meta) if isinstance(meta, dict) and meta.get("name") else cls()


@dataclass(frozen=True)
class TrainFlag:
    """A `noble train` option a task adds: `--NAME VALUE` (or `--NAME/--no-NAME` for a switch) sets config `key`."""

    name: str  # a Python identifier; the option is --name with '_' as '-'
    key: str  # e.g. "data.mixup"
    kind: type  # bool, int, float or str
    help: str


class Task(ABC):
    """A task noble can train. Subclasses set the class attributes and write the abstract methods."""

    name: ClassVar[str]
    model_class: ClassVar[type[ConfigModel]]
    data_class: ClassVar[type[ConfigModel]]
    metric: ClassVar[Metric] = Metric()

    def check(self, cfg: RunConfig) -> None:
        """Checks across fields and sections (each field's own range is checked by its type): e.g. a sequence
        longer than the model's context. Raise NobleError with one line naming the fields and what is valid."""

    @abstractmethod
    def build_module(self, cfg: RunConfig) -> NobleTask:
        """The LightningModule that trains this task (its model built with NOBLE from `cfg.noble`)."""

    @abstractmethod
    def build_datamodule(self, cfg: RunConfig) -> L.LightningDataModule:
        """The data, streamed so that every batch is a function of the seed and its position (exact resume)."""

    @abstractmethod
    def synthetic_batch(self, module: NobleTask, batch_size: int, generator: torch.Generator) -> tuple[Any, int]:
        """(a random batch of the task's shapes on the CPU, the items it counts for throughput)."""

    @abstractmethod
    def data_summary(self, cfg: RunConfig) -> str:
        """One line on the data, for `noble recipes`."""

    def text_tokenizer(self, cfg: RunConfig) -> TextTokenizer | None:
        """The tokenizer of a task whose tokens are text, which `noble sample` encodes prompts and decodes samples
        with; None for a task whose tokens are not text (image codes) or that has none."""
        return None

"""The task registry. A task is a module that defines:

- `ModelConfig`, `DataConfig`: dataclasses for the recipe's `model:` and `data:` sections;
- `build_module(cfg) -> NobleTask` (a LightningModule, see `noble_cli.tasks.base`);
- `build_datamodule(cfg) -> LightningDataModule`;
- `data_summary(cfg) -> str`: one line on the data, for `noble recipes`.

Task modules are imported lazily so that `noble --help` and the tests of one task stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass

from noble_cli.errors import NobleError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    module_path: str
    description: str

    def load(self):
        return importlib.import_module(self.module_path)

    def model_config(self, cfg):
        return _typed(self.load().ModelConfig, cfg.model, "model")

    def data_config(self, cfg):
        return _typed(self.load().DataConfig, cfg.data, "data")

    def check(self, cfg) -> None:
        """Validate `model:` and `data:` and write them back complete and typed (the resolved config)."""
        cfg.model = asdict(self.model_config(cfg))
        cfg.data = asdict(self.data_config(cfg))
        check = getattr(self.load(), "check", None)
        if check:
            check(cfg)


def _typed(cls, values: dict, section: str):
    from noble_cli.config import build_typed

    return build_typed(cls, values, section)


TASKS: dict[str, TaskSpec] = {}


def register(name: str, module_path: str, description: str) -> None:
    TASKS[name] = TaskSpec(name, module_path, description)


register("causal_lm", "noble_cli.tasks.causal_lm", "GPT causal language modelling")
register("masked_lm", "noble_cli.tasks.masked_lm", "BERT masked language modelling")
register("vit", "noble_cli.tasks.vit", "ViT image classification")
register("vqgan", "noble_cli.tasks.vqgan", "transformer VQGAN image tokenizer")
register("image_lm", "noble_cli.tasks.image_lm", "autoregressive modelling of VQGAN image tokens")


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise NobleError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name]

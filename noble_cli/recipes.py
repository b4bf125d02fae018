"""Recipe listing: parameter counts are taken on the meta device, so even llm-1.5b costs no memory."""

from __future__ import annotations

import dataclasses

import torch

from noble_cli import config as C
from noble_cli.errors import NobleError
from noble_cli.tasks import get_task


def count_recipe_params(cfg: C.RunConfig) -> tuple[int, int]:
    """(total, branch) parameters of the model this config trains."""
    with torch.device("meta"):
        module = get_task(cfg.task).load().build_module(cfg)
    return module.params.total, module.params.branch


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def recipe_rows() -> list[tuple[str, ...]]:
    rows = []
    for name in C.list_recipes():
        try:
            cfg = C.resolve(name)
            base, _ = count_recipe_params(cfg)
            with_branch = dataclasses.replace(cfg, noble=dataclasses.replace(cfg.noble, branch="cosnet"))
            total, branch = count_recipe_params(with_branch)
            task = get_task(cfg.task).load()
            rows.append((name, cfg.task, _human(base), f"+{100 * branch / (total - branch):.1f}% (r{cfg.noble.rank})",
                         task.data_summary(cfg), str(cfg.trainer.max_steps)))
        except (NobleError, ImportError) as e:  # one broken recipe must not hide the others
            rows.append((name, "?", "?", "?", f"[red]{e}[/]", "?"))
    return rows

"""Recipes: YAML files that mirror `RunConfig`, read into a validated config with `--set` overrides applied.

`resolve(recipe, overrides, sets)` is how every command gets its config; `from_dict` rebuilds one from a mapping (a
run folder's config.yaml, a sweep manifest entry, a checkpoint). Both look the task up in the registry, validate
its `model:` and `data:` sections with the task's own classes, then the rest, then the task's cross-field checks:
any problem is one line (NobleError) naming the field and what is valid. `noble recipes` lists them, with parameter
counts taken on the meta device (even llm-1.5b costs no memory).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from noble_cli.config import TASK_SECTIONS, TOP_LEVEL, RunConfig, validated
from noble_cli.errors import NobleError, choices_error
from noble_cli.tasks import get_task

REPO_ROOT = Path(__file__).resolve().parent.parent


def recipes_dir() -> Path:
    return Path(os.environ.get("NOBLE_RECIPES", REPO_ROOT / "recipes"))


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (recipes/NAME.yaml) or a path to the user's own YAML file, as a plain dict."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = recipes_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise choices_error("recipe", name_or_path, list_recipes() + ["<path/to/recipe.yaml>"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise NobleError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NobleError(f"recipe {path} must be a mapping of sections, got {type(data).__name__}")
    data.setdefault("recipe", path.stem)
    return data


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (['section', 'key'], parsed value). Values are read as YAML (3, 1e-3, true, [1,2])."""
    if "=" not in assignment:
        raise NobleError(f"malformed --set {assignment!r}; expected section.key=value, e.g. optim.lr=3e-4")
    key, raw = assignment.split("=", 1)
    path = key.strip().split(".")
    if not all(path) or (len(path) < 2 and path[0] not in TOP_LEVEL):
        raise NobleError(f"malformed --set {assignment!r}; expected section.key=value, e.g. optim.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def set_path(d: dict, path: list[str], value: Any) -> None:
    node = d
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise NobleError(f"cannot set {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def recipe_task(recipe: str, sets: list[str]) -> str:
    """The task of a recipe with its `--set`s, without validating anything else."""
    task = load_recipe(recipe).get("task", RunConfig.model_fields["task"].default)
    for s in sets:
        path, value = parse_set(s)
        if path == ["task"]:
            task = value
    return str(task)


def resolve(recipe: str, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> RunConfig:
    """Recipe + explicit overrides ({'noble.branch': 'cosnet'}; None keeps the recipe's) + `--set` strings -> a
    validated RunConfig."""
    d = load_recipe(recipe)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(d, key.split("."), value)
    for s in sets or []:
        path, value = parse_set(s)
        set_path(d, path, value)
    return from_dict(d)


def from_dict(d: dict) -> RunConfig:
    """A validated RunConfig from a mapping: the task's sections with the task's classes, then the rest, then the
    task's checks across fields."""
    if not isinstance(d, dict):
        raise NobleError(f"a config must be a mapping of sections, got {type(d).__name__}")
    task = get_task(str(d.get("task", RunConfig.model_fields["task"].default)))
    typed = {section: validated(cls, d.get(section) or {}, f"{section}.")
             for section, cls in zip(TASK_SECTIONS, (task.model_class, task.data_class))}
    cfg = validated(RunConfig, {**{k: v for k, v in d.items() if k not in TASK_SECTIONS}, **typed})
    task.check(cfg)
    return cfg


def with_branch(cfg: RunConfig, branch: str) -> RunConfig:
    """The same config with another branch (no other change)."""
    return cfg.model_copy(update={"noble": cfg.noble.model_copy(update={"branch": branch})})


# --- `noble recipes` ------------------------------------------------------------------------------------------------
def count_recipe_params(cfg: RunConfig) -> tuple[int, int]:
    """(total, branch) parameters of the model this config trains."""
    import torch

    with torch.device("meta"):
        module = get_task(cfg.task).build_module(cfg)
    return module.params.total, module.params.branch


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def recipe_rows() -> list[tuple[str, ...]]:
    rows = []
    for name in list_recipes():
        try:
            cfg = resolve(name)
            base, _ = count_recipe_params(cfg)
            total, branch = count_recipe_params(with_branch(cfg, "cosnet"))
            rows.append((name, cfg.task, _human(base), f"+{100 * branch / (total - branch):.1f}% (r{cfg.noble.rank})",
                         get_task(cfg.task).data_summary(cfg), str(cfg.trainer.max_steps)))
        except (NobleError, ImportError) as e:  # one broken recipe must not hide the others
            rows.append((name, "?", "?", "?", f"[red]{e}[/]", "?"))
    return rows

"""Typed run configuration: dataclasses, recipes (YAML files mirroring them), `--set` overrides and hashing.

A run is fully described by one `RunConfig`. Recipes in `recipes/*.yaml` have the same sections; the task decides
the fields of `model` and `data` (each task has its own dataclasses for them, see `noble_cli.tasks`), the other
sections are common to every task. The resolved config saved in a run folder is enough to rerun that run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from noble_cli.errors import NobleError, choices_error

REPO_ROOT = Path(__file__).resolve().parent.parent


def recipes_dir() -> Path:
    return Path(os.environ.get("NOBLE_RECIPES", REPO_ROOT / "recipes"))


def added_field(default: Any, **kwargs) -> Any:
    """A config field added after run folders already existed: left out of the config hash (and so of run ids and
    pair keys) while it keeps its default, so that adding it does not orphan every earlier result."""
    return field(default=default, metadata={"added": True}, **kwargs)


@dataclass
class NobleConfig:
    """The branch. `branch: none` is the baseline."""

    branch: str = "none"  # an activation from the registry (cosnet, cos, gelu_net, ...) or none
    rank: int = 32
    targets: str = "all"  # all | attn | mlp | alternate | glob patterns over module names
    up_init_scale: float = 0.01
    main_init_scale: float | None = 0.5  # re-init augmented layers' main W with N(0, (s/sqrt(in))^2); null keeps it
    up_lr_power: float = 0.4
    mix_lr_power: float = 0.5  # CosNet mix: (min(in,out)/r)^power; 0 = the reference code's effective 1
    freq_lr_mult: float = 2.0
    phase_lr_mult: float = 4.0
    kernel: str = "auto"  # auto (triton on CUDA, torch elsewhere) | torch | triton
    dense_match: bool = False  # baseline only: widen the MLP until it has the params of `match_branch` at `rank`
    match_branch: str = "cosnet"
    # The init-only control: no branch, but the targeted layers' main weights re-initialised as NOBLE's are
    # (N(0, (main_init_scale/sqrt(in))^2), bias 0), so a speedup can be told from the init change that comes with it.
    init_only: bool = added_field(False)

    @property
    def enabled(self) -> bool:
        return self.branch != "none"


@dataclass
class OptimConfig:
    lr: float = 6e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # 0 or null: no clipping


@dataclass
class ScheduleConfig:
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    batch_size: int = 16
    accumulate: int = 1
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 1  # metrics.csv gets a row every N steps (and step 1, and every evaluation)
    precision: str = "auto"  # auto (bf16-mixed on GPU, 32 on CPU) | 32 | bf16-mixed | 16-mixed
    compile: bool = False
    activation_checkpointing: bool = False
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | any Lightning strategy name
    kernel_warmup_steps: int = 5  # steps left out of the median step time
    num_workers: int = 0
    # Experiment trackers that mirror the run folder: a list of tensorboard, wandb, mlflow, or one comma-separated
    # string (noble_cli/trackers.py makes it a tuple). Where a run is watched, not what it computes: not hashed.
    logger: Any = added_field(())


@dataclass
class RunConfig:
    recipe: str = ""
    task: str = "causal_lm"
    seed: int = 0
    name: str = ""  # a variant label; derived from `noble` when empty
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    noble: NobleConfig = field(default_factory=NobleConfig)

    @property
    def variant(self) -> str:
        return self.name or variant_label(self.noble)

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {"optim": OptimConfig, "schedule": ScheduleConfig, "trainer": TrainerConfig, "noble": NobleConfig}
FREE_SECTIONS = ("model", "data")  # checked by the task's own dataclasses
TOP_LEVEL = ("recipe", "task", "seed", "name")


def _init_label(scale: float | None) -> str:
    return "own-init" if scale is None else f"main-init {scale:g}"


# Branch settings that labels name only where they differ from their defaults: they were invisible in labels (and so
# in run ids) before, so naming them at the defaults would rename every existing run folder.
_LABELLED_AT_NON_DEFAULT = (
    ("main_init_scale", _init_label),
    ("up_init_scale", lambda v: f"up-init {v:g}"),
    ("up_lr_power", lambda v: f"up-lr^{v:g}"),
    ("mix_lr_power", lambda v: f"mix-lr^{v:g}"),
    ("freq_lr_mult", lambda v: f"freq-lr x{v:g}"),
    ("phase_lr_mult", lambda v: f"phase-lr x{v:g}"),
)


def variant_label(n: NobleConfig, in_run_id: bool = False) -> str:
    """A label that names every setting in which two variants' identities differ (so two runs of a report never
    share a name): the branch, rank, targets, and any other branch setting away from its default. `in_run_id`: the
    label as run ids spell it, without the settings labels gained later (run ids of existing folders must not
    change; the config hash in the run id tells such variants apart anyway)."""
    where = "" if n.targets == "all" else f" {n.targets}"
    if not n.enabled:
        if n.dense_match:
            return f"dense-matched({n.match_branch} r{n.rank}{where})"
        if n.init_only:
            return f"init-only({_init_label(n.main_init_scale)}{where})"
        return "baseline"
    label = f"{n.branch} r{n.rank}{where}"
    for name, fmt in () if in_run_id else _LABELLED_AT_NON_DEFAULT:
        value = getattr(n, name)
        if value != getattr(_DEFAULT_NOBLE, name):
            label += f" {fmt(value)}"
    # An explicit kernel is part of the label: `--kernel torch` vs `--kernel triton` is a wall-clock comparison,
    # and the two must not show up in a report as two rows of the same name.
    return label if n.kernel == "auto" or n.branch != "cosnet" else f"{label} [{n.kernel}]"


_DEFAULT_NOBLE = NobleConfig()


def coerce(value: Any, type_name: str, where: str) -> Any:
    """Give a YAML or --set value the field's declared type (YAML reads 1e-3 as a string; flags arrive as text)."""
    compact = type_name.replace(" ", "")
    optional = "|None" in compact or "Optional[" in compact
    base = compact.replace("|None", "").replace("Optional[", "").rstrip("]")
    if value is None:
        if optional or base == "Any":
            return None
        raise NobleError(f"{where} must be of type {base}, got null")
    if not isinstance(value, (str, int, float, list, tuple)):
        if base in ("str", "int", "float", "bool") or base.startswith("tuple"):
            raise NobleError(f"{where} must be of type {base}, got {value!r}")
        return value
    try:
        if base == "str":
            if isinstance(value, (list, tuple)):
                raise ValueError
            return str(value)
        if base in ("float", "int") and isinstance(value, bool):
            raise ValueError  # YAML's true/false are not numbers here
        if base == "float":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if base == "int":
            number = float(value) if isinstance(value, str) else value  # "1e3" from a --set is 1000
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        if base == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if not isinstance(value, bool) and value not in (0, 1):
                raise ValueError
            return bool(value)
        if base.startswith("tuple"):
            if not isinstance(value, (list, tuple)):
                raise ValueError
            want = base.count(",") + 1 if "..." not in base else None
            if want is not None and len(value) != want:
                raise NobleError(f"{where} must be a list of {want} values, got {list(value)!r}")
            return tuple(float(v) for v in value) if "float" in base else tuple(value)
    except (TypeError, ValueError, OverflowError):
        raise NobleError(f"{where} must be of type {base}, got {value!r}") from None
    return value


def build_typed(cls, values: dict, where: str):
    """A dataclass from a mapping, with unknown keys and wrong types reported as one line."""
    names = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(names)
    if unknown:
        raise NobleError(f"unknown key {where}.{sorted(unknown)[0]}; valid: {', '.join(sorted(names))}")
    typed = {k: coerce(v, str(names[k].type), f"{where}.{k}") for k, v in values.items()}
    return cls(**typed)


def from_dict(d: dict) -> RunConfig:
    unknown = set(d) - set(SECTIONS) - set(FREE_SECTIONS) - set(TOP_LEVEL)
    if unknown:
        valid = list(SECTIONS) + list(FREE_SECTIONS) + list(TOP_LEVEL)
        raise NobleError(f"unknown config section {sorted(unknown)[0]!r}; valid: {', '.join(valid)}")
    kwargs: dict[str, Any] = {k: d[k] for k in TOP_LEVEL if k in d}
    if "seed" in kwargs:
        kwargs["seed"] = coerce(kwargs["seed"], "int", "seed")
    if "name" in kwargs:
        kwargs["name"] = coerce(kwargs["name"], "str", "name")
    for name in list(FREE_SECTIONS) + list(SECTIONS):
        if not isinstance(d.get(name) or {}, dict):
            raise NobleError(f"config section {name} must be a mapping of keys, got {d[name]!r}")
    for name in FREE_SECTIONS:
        kwargs[name] = dict(d.get(name) or {})
    for name, cls in SECTIONS.items():
        kwargs[name] = build_typed(cls, dict(d.get(name) or {}), name)
    return RunConfig(**kwargs)


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


def resolve(recipe: str, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> RunConfig:
    """Recipe + explicit overrides ({'noble.branch': 'cosnet'}) + `--set` strings -> a validated RunConfig."""
    d = load_recipe(recipe)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_path(d, key.split("."), value)
    for s in sets or []:
        path, value = parse_set(s)
        set_path(d, path, value)
    cfg = from_dict(d)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no model: names from registries and value ranges. The task checks model/data."""
    from noble_cli.layers import KERNELS, resolve_activation
    from noble_cli.layers.apply import target_matcher
    from noble_cli.tasks import TASKS

    if cfg.task not in TASKS:
        raise choices_error("task", cfg.task, list(TASKS))
    n = cfg.noble
    if n.enabled:
        n.branch = resolve_activation(n.branch)
    if n.dense_match:
        if n.enabled:
            raise NobleError("noble.dense_match is for the baseline only: set noble.branch=none with it")
        n.match_branch = resolve_activation(n.match_branch)
    if n.init_only:
        if n.enabled or n.dense_match:
            raise NobleError("noble.init_only is a control without a branch or widening: set noble.branch=none "
                             "and noble.dense_match=false with it")
        if n.main_init_scale is None or n.main_init_scale <= 0:
            shown = "null" if n.main_init_scale is None else n.main_init_scale
            raise NobleError(f"noble.init_only re-initialises the main weights at noble.main_init_scale, which is "
                             f"{shown}: set a number > 0 (the paper's is 0.5)")
    target_matcher(n.targets)
    if n.rank < 1:
        raise NobleError(f"rank {n.rank} is invalid; it must be >= 1 and < min(in, out) of every augmented layer")
    if n.kernel not in ("auto",) + KERNELS:
        raise choices_error("kernel", n.kernel, ("auto",) + KERNELS)
    if cfg.schedule.decay not in ("cosine", "linear", "constant"):
        raise choices_error("schedule.decay", cfg.schedule.decay, ("cosine", "linear", "constant"))
    t = cfg.trainer
    for name in ("max_steps", "batch_size", "eval_every", "eval_batches", "accumulate", "log_every"):
        if getattr(t, name) < 1:
            raise NobleError(f"trainer.{name} must be >= 1, got {getattr(t, name)}")
    for name in ("num_workers", "kernel_warmup_steps"):
        if getattr(t, name) < 0:
            raise NobleError(f"trainer.{name} must be >= 0, got {getattr(t, name)}")
    if t.precision not in PRECISIONS:
        raise choices_error("trainer.precision", t.precision, PRECISIONS)
    from noble_cli.trackers import parse_loggers

    t.logger = parse_loggers(t.logger)
    if not 0 <= cfg.seed < 2**32:
        raise NobleError(f"seed must be in [0, 2^32), got {cfg.seed}")
    _check_ranges(cfg)
    TASKS[cfg.task].check(cfg)


PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true")


def _check_ranges(cfg: RunConfig) -> None:
    """Values the optimizer or schedule would take silently and train wrongly with (or crash on mid-run)."""
    o, s = cfg.optim, cfg.schedule
    checks = [
        ("optim.lr", o.lr, o.lr > 0, "> 0"),
        ("optim.eps", o.eps, o.eps > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip is None or o.grad_clip >= 0, ">= 0 (0 or null: no clipping)"),
        ("optim.betas", list(o.betas), all(0 <= b < 1 for b in o.betas), "two values in [0, 1)"),
        ("schedule.warmup_steps", s.warmup_steps, s.warmup_steps >= 0, ">= 0"),
        ("schedule.min_lr_ratio", s.min_lr_ratio, 0 <= s.min_lr_ratio <= 1, "in [0, 1]"),
    ]
    for name, value, ok, rule in checks:
        if not ok:
            raise NobleError(f"{name} must be {rule}, got {value}")


# Fields that change where or how fast a run goes, not what it computes: left out of the config hash.
_NOT_HASHED = {"trainer": ("devices", "num_nodes", "strategy", "accelerator", "num_workers", "log_every", "logger")}


def _noble_identity(n: NobleConfig) -> dict:
    """The `noble` fields that change what a run computes. A plain baseline has no branch, so none of the others
    do: `--set noble.mix_lr_power=0` on a sweep must not make (and train) a second, identical baseline. A
    dense-matched baseline depends only on what its width is matched to, the init-only control only on its
    re-init (scale and layers)."""
    if n.enabled:
        d = _json(n.__dict__)
        _drop_added_defaults(d, NobleConfig)
        if n.branch != "cosnet":  # the fused kernels are CosNet's only: any other branch runs the torch path
            d["kernel"] = "auto"
        return d
    if n.dense_match:
        return {"branch": "none", "dense_match": True, "match_branch": n.match_branch, "rank": n.rank,
                "targets": n.targets}
    if n.init_only:  # the re-init alone: only its scale and the layers it touches
        return {"branch": "none", "init_only": True, "main_init_scale": n.main_init_scale, "targets": n.targets}
    return {"branch": "none"}


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _drop_added_defaults(d: dict, cls) -> None:
    for f in fields(cls):
        if f.metadata.get("added") and f.name in d:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if d[f.name] == _json(default):
                del d[f.name]


def _section_classes(cfg: RunConfig) -> dict:
    from noble_cli.tasks import TASKS

    classes = dict(SECTIONS)
    if cfg.task in TASKS:
        task = TASKS[cfg.task].load()
        classes.update(model=task.ModelConfig, data=task.DataConfig)
    return classes


def hashable_dict(cfg: RunConfig) -> dict:
    d = _json(cfg.to_dict())
    for section, keys in _NOT_HASHED.items():
        for k in keys:
            d[section].pop(k, None)
    for section, cls in _section_classes(cfg).items():
        if section != "noble":
            _drop_added_defaults(d[section], cls)
    d["noble"] = _noble_identity(cfg.noble)
    return d


def digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def config_hash(cfg: RunConfig) -> str:
    """Identity of a run's computation, seed included."""
    return digest(hashable_dict(cfg))


def pair_key(cfg: RunConfig, world_size: int = 1, data_identity: dict | None = None) -> str:
    """What a variant and its baseline share: everything but the branch, the seed and the label. `batch_size` is
    per device, so a run on several devices (known once the trainer is up) pairs only with the same world size;
    `data_identity` is what the data depends on beyond the config (the task's `data_identity()`)."""
    d = hashable_dict(cfg)
    for k in ("noble", "seed", "name"):
        d.pop(k, None)
    if world_size != 1:
        d["world_size"] = int(world_size)
    if data_identity:
        d["data_identity"] = data_identity
    return digest(d)


def variant_key(cfg: RunConfig) -> str:
    return digest([_noble_identity(cfg.noble), cfg.name])


def run_id(cfg: RunConfig) -> str:
    """A stable id: recipe, variant, seed and the config hash. The same config always maps to the same folder."""
    variant = cfg.name or variant_label(cfg.noble, in_run_id=True)
    label = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in variant).strip("-")
    while "--" in label:
        label = label.replace("--", "-")
    return f"{cfg.recipe}-{label}-s{cfg.seed}-{config_hash(cfg)}"


def to_yaml(obj: Any) -> str:
    if is_dataclass(obj):
        obj = asdict(obj)
    return yaml.safe_dump(json.loads(json.dumps(obj, default=str)), sort_keys=False)


def replace(cfg: RunConfig, **changes) -> RunConfig:
    return dataclasses.replace(cfg, **changes)

"""Typed run configuration: the sections of a run (pydantic models), its label and its identity.

A run is fully described by one `RunConfig`. Its sections `optim`, `schedule`, `trainer` and `noble` are the same
for every task; `model` and `data` are the task's own config classes (see `noble_cli.tasks`). Recipes
(recipes/*.yaml) mirror these sections and are read into a RunConfig by `noble_cli.recipes`, which also applies
`--set` overrides. Every field's docstring is its documentation. A value that does not fit its field is refused
with one line naming the field and what is valid (`config_error`), before anything is trained or written.

Identity: the config hash covers what a run computes (not where it runs), and is part of the run id (its folder's
name) and of the pair key (what a variant shares with its baseline). A field added after run folders existed is
declared with `added_field`, which keeps it out of the hash while it keeps its default, so adding it does not
orphan earlier results (tests/test_run_ids.py pins existing ids).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from noble_cli.errors import NobleError
from noble_cli.layers.implementation import has_fused_kernel
from noble_cli.parsing import split_list


# --- field types ----------------------------------------------------------------------------------------------------
def _type_error(kind: str, value: Any) -> PydanticCustomError:
    return PydanticCustomError("noble_type", "must be of type {kind}, got {value}",
                               {"kind": kind, "value": "null" if value is None else repr(value)})


def _as_int(value: Any) -> Any:
    """Integers, also written as `1e3` or `1000.0` (a --set value); never a boolean (YAML's true is not 1)."""
    if isinstance(value, bool):
        raise _type_error("int", value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _type_error("int", value) from None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise _type_error("int", value)
    return int(value) if isinstance(value, float) else value


def _as_float(value: Any) -> Any:
    """Finite numbers (YAML reads `1e-3` as a string: it is a number here); never a boolean."""
    if isinstance(value, bool):
        raise _type_error("float", value)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _type_error("float", value) from None
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise _type_error("float", value)
    return value


def _as_str(value: Any) -> Any:
    """Text; a number (`name=123` reads as 123) becomes its text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


def _exactly(n: int):
    def check(value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) != n:
            raise PydanticCustomError("noble_length", "must be a list of {n} values, got {value}",
                                      {"n": n, "value": repr(list(value))})
        return value

    return check


Int = Annotated[int, BeforeValidator(_as_int)]
Float = Annotated[float, BeforeValidator(_as_float)]
Str = Annotated[str, BeforeValidator(_as_str)]
FloatPair = Annotated[tuple[Float, Float], BeforeValidator(_exactly(2))]


def added_field(default: Any, **kwargs) -> Any:
    """A field added after run folders already existed: left out of the config hash (and so of run ids and pair
    keys) while it keeps its default, so that adding it does not orphan every earlier result."""
    return Field(default, json_schema_extra={"added": True}, **kwargs)


class ConfigModel(BaseModel):
    """A config section: unknown keys are refused, every assignment is validated, field docstrings document it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              protected_namespaces=())


# --- the common sections --------------------------------------------------------------------------------------------
class NobleConfig(ConfigModel):
    """The NOBLE branch. `branch: none` is the baseline (or, with `dense_match` / `init_only`, one of its controls)."""

    branch: Str = "none"
    """An activation from the registry (cosnet, cos, gelu_net, ...; `noble layers --help` lists them) or `none`."""
    rank: Int = Field(32, ge=1)
    """The branch's bottleneck width r (absolute, not a fraction of the layer's width)."""
    targets: Str = "all"
    """Which linears get a branch: all | attn | mlp | alternate, or glob patterns over module names."""
    up_init_scale: Float = 0.01
    """W_up ~ N(0, (up_init_scale/sqrt(r))^2): near zero, so a layer starts as its main linear map."""
    main_init_scale: Float | None = 0.5
    """Re-initialise an augmented layer's main W with N(0, (s/sqrt(in))^2), as the paper does; null keeps the
    model's own init (then a speedup is the branch's alone)."""
    up_lr_power: Float = 0.4
    """W_up's learning-rate multiplier is (min(in, out)/r)^up_lr_power."""
    mix_lr_power: Float = 0.5
    """An r x r mix matrix's multiplier is (min(in, out)/r)^mix_lr_power; 0 gives the reference code's effective 1."""
    freq_lr_mult: Float = 2.0
    """Learning-rate multiplier of the cosine frequencies."""
    phase_lr_mult: Float = 4.0
    """Learning-rate multiplier of the cosine phases."""
    kernel: Str = "auto"
    """The branch's implementation: auto (the fused Triton kernels on CUDA, after a self-check; torch elsewhere),
    torch, or triton (an error, not a fallback, if the fused kernels fail)."""
    dense_match: bool = False
    """Baseline only: widen the MLP until the model has the parameters of `match_branch` at `rank`."""
    match_branch: Str = "cosnet"
    """The branch whose parameter count a dense-matched baseline matches."""
    init_only: bool = added_field(False)
    """The init-only control: no branch, but the targeted layers' main weights re-initialised as NOBLE's are
    (N(0, (main_init_scale/sqrt(in))^2), bias 0), so a speedup can be told from the init change that comes with it."""

    @property
    def enabled(self) -> bool:
        return self.branch != "none"

    @field_validator("branch", "match_branch")
    @classmethod
    def _registered_activation(cls, name: str) -> str:
        from noble_cli.layers.activations import resolve_activation

        return name if name == "none" else _as_value_error(resolve_activation, name)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, spec: str) -> str:
        from noble_cli.layers.apply import target_matcher

        _as_value_error(target_matcher, spec)
        return spec

    @field_validator("kernel")
    @classmethod
    def _known_kernel(cls, kernel: str) -> str:
        from noble_cli.layers.implementation import REQUESTS

        if kernel not in REQUESTS:
            raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(REQUESTS)}")
        return kernel

    @model_validator(mode="after")
    def _one_arm(self) -> NobleConfig:
        if self.match_branch == "none":
            raise ValueError("noble.match_branch must name an activation, not none")
        if self.dense_match and self.enabled:
            raise ValueError("noble.dense_match is for the baseline only: set noble.branch=none with it")
        if self.init_only:
            if self.enabled or self.dense_match:
                raise ValueError("noble.init_only is a control without a branch or widening: set noble.branch=none "
                                 "and noble.dense_match=false with it")
            if self.main_init_scale is None or self.main_init_scale <= 0:
                shown = "null" if self.main_init_scale is None else self.main_init_scale
                raise ValueError(f"noble.init_only re-initialises the main weights at noble.main_init_scale, which "
                                 f"is {shown}: set a number > 0 (the paper's is 0.5)")
        return self


def _as_value_error(check, value):
    """A registry's NobleError as a pydantic value error (which `config_error` turns back into the same line)."""
    try:
        return check(value)
    except NobleError as e:
        raise ValueError(str(e)) from None


OPTIMIZERS = ("adamw", "muon")
MUON_ADJUST_LR = ("original", "match_rms_adamw", "spectral_unclamped")


class OptimConfig(ConfigModel):
    """AdamW with NOBLE's per-parameter learning-rate multipliers, or Muon on the blocks' matrices with AdamW for
    the rest (`name: muon`; noble_cli/tasks/optimizers.py says who goes where)."""

    lr: Float = Field(6e-4, gt=0)
    """The base learning rate (NOBLE's branch parameters get multiples of it)."""
    weight_decay: Float = Field(0.1, ge=0)
    """Decoupled weight decay, on matrices only (not biases, norms, cosine frequencies and phases)."""
    betas: FloatPair = (0.9, 0.95)
    """AdamW's (beta1, beta2), each in [0, 1)."""
    eps: Float = Field(1e-8, gt=0)
    grad_clip: Float | None = Field(1.0, ge=0)
    """Clip the global gradient norm to this; 0 or null: no clipping."""

    name: Literal[OPTIMIZERS] = added_field("adamw")
    """adamw: every parameter on AdamW. muon: torch.optim.Muon on the 2-D main weights of the transformer blocks'
    linear layers; embeddings, heads, norms, biases and (see branch_optimizer) NOBLE's branches on AdamW with
    `lr`, `betas`, `eps`, `weight_decay` and NOBLE's multipliers. Both follow the same schedule."""
    branch_optimizer: Literal[OPTIMIZERS] = added_field("adamw")
    """With name: muon, where the branch matrices (W_down, W_up, the r x r mixes) go. adamw (default): AdamW with
    NOBLE's lr multipliers, which were tuned for AdamW. muon: Muon at muon_lr and its own shape adjustment, no
    multipliers (its vectors, the cosine frequencies and phases and the biases, stay on AdamW). Configurable
    because ports disagree: one found branch matrices under Muon with multipliers > 1 diverging by step 2, another
    keeps W_down on Muon. A branch setting: NOBLE runs with either pair with the same Muon baseline."""
    muon_lr: Float = added_field(0.02, gt=0)
    """Muon's learning rate (before adjust_lr_fn), scheduled like lr."""
    muon_momentum: Float = added_field(0.95, ge=0, lt=1)
    """Muon's momentum (an EMA of the gradients, orthogonalized each step)."""
    muon_nesterov: bool = added_field(True)
    """Nesterov momentum: orthogonalize g + momentum x (the momentum buffer) rather than the buffer."""
    muon_ns_steps: Int = added_field(5, ge=1, lt=100)
    """Newton-Schulz iterations that orthogonalize the update (5: Keller Jordan's quintic)."""
    muon_weight_decay: Float = added_field(0.0, ge=0)
    """Muon's decoupled weight decay: W <- W (1 - lr x muon_weight_decay) each step, lr being muon_lr as
    scheduled (0 as in Keller Jordan's Muon; Moonlight uses 0.1 with match_rms_adamw)."""
    muon_adjust_lr_fn: Literal[MUON_ADJUST_LR] = added_field("original")
    """How the update is scaled to the matrix's shape (out, in): original, sqrt(max(1, out/in)) (Keller Jordan);
    match_rms_adamw, 0.2 sqrt(max(out, in)), for an update of AdamW's size, so muon_lr can be near lr (Moonlight);
    spectral_unclamped, sqrt(out/in) (Bernstein; recent torch only: refused where the installed one lacks it)."""

    @field_validator("name")
    @classmethod
    def _muon_installed(cls, name: str) -> str:
        import torch

        if name == "muon" and not hasattr(torch.optim, "Muon"):
            raise ValueError(f"optim.name muon needs torch.optim.Muon (torch >= 2.9); this torch is "
                             f"{torch.__version__}; valid here: adamw")
        return name

    @field_validator("muon_adjust_lr_fn")
    @classmethod
    def _adjust_known_to_torch(cls, fn: str) -> str:
        import torch

        if fn != "original" and hasattr(torch.optim, "Muon"):
            try:  # torch's own check: spectral_unclamped came after Muon itself
                torch.optim.Muon([torch.zeros(2, 2)], adjust_lr_fn=fn)
            except ValueError:
                raise ValueError(f"optim.muon_adjust_lr_fn {fn!r} is not known to torch {torch.__version__}; "
                                 "valid here: original, match_rms_adamw") from None
        return fn

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {list(betas)}")
        return betas


class ScheduleConfig(ConfigModel):
    """The learning-rate schedule, stepped every optimizer step."""

    warmup_steps: Int = Field(100, ge=0)
    """Linear warm-up from lr/warmup_steps to lr."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """After the warm-up, down to min_lr_ratio x lr at max_steps (or constant)."""
    min_lr_ratio: Float = Field(0.1, ge=0, le=1)


PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "64", "64-true")
TRACKERS = ("tensorboard", "wandb", "mlflow")  # experiment trackers (noble_cli/trackers.py)


def parse_loggers(value: Any) -> tuple[str, ...]:
    """`trainer.logger` / `--logger` values -> a tuple of tracker names: a list, or comma-separated strings."""
    if value is None or value == "":
        return ()
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if items is None or not all(isinstance(v, str) for v in items):
        raise NobleError(f"trainer.logger must be a list of tracker names ({', '.join(TRACKERS)}), got {value!r}")
    names = [n.lower() for v in items for n in split_list(v)]
    for n in names:
        if n not in TRACKERS:
            raise NobleError(f"unknown logger {n!r}; valid: {', '.join(TRACKERS)} (repeat --logger for several)")
    return tuple(dict.fromkeys(names))


Loggers = Annotated[tuple[str, ...], BeforeValidator(lambda v: _as_value_error(parse_loggers, v))]


class TrainerConfig(ConfigModel):
    """The training loop (Lightning's Trainer) and what it records."""

    max_steps: Int = Field(1000, ge=1)
    """The budget, in optimizer steps."""
    batch_size: Int = Field(16, ge=1)
    """Sequences (or images) per micro-batch, per device."""
    accumulate: Int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    eval_every: Int = Field(100, ge=1)
    """Optimizer steps between evaluations (the budget's end is always evaluated)."""
    eval_batches: Int = Field(20, ge=1)
    """Fixed evaluation batches, the same at every evaluation."""
    log_every: Int = Field(1, ge=1)
    """metrics.csv gets a row every N steps (and at step 1 and every evaluation)."""
    precision: Literal[PRECISIONS] = "auto"
    """auto: bf16-mixed on a GPU, 32 on the CPU; or any of Lightning's precisions listed."""
    compile: bool = False
    """torch.compile the model."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward (FSDP: Lightning checkpoints the blocks)."""
    accelerator: Str = "auto"
    devices: Any = "auto"
    """Lightning's devices: auto, a count, or a list of indices."""
    num_nodes: Int = Field(1, ge=1)
    strategy: Str = "auto"
    """auto | ddp | fsdp | any Lightning strategy name."""
    untimed_steps: Int = Field(5, ge=0, validation_alias=AliasChoices("untimed_steps", "kernel_warmup_steps"))
    """The first steps (compilation, autotuning) left out of the median step time. Formerly kernel_warmup_steps,
    which config files may still say."""
    num_workers: Int = Field(0, ge=0)
    """Data-loader worker processes."""
    logger: Loggers = added_field(())
    """Experiment trackers that mirror the run folder: tensorboard, wandb, mlflow (a list, or comma-separated).
    Where a run is watched, not what it computes: not hashed."""

    def uses_cuda(self) -> bool:
        """Whether the run trains on a CUDA GPU: accelerator gpu or cuda, or auto with one visible. What the
        precision, the kernels' plan and the trainer all follow."""
        import torch

        return self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available())

    @property
    def micro_batches(self) -> int:
        """The budget in micro-batches, what a training loader must yield: max_steps x accumulate."""
        return self.max_steps * self.accumulate


class RunConfig(ConfigModel):
    """One run: the task, its model and data, and the common sections."""

    recipe: Str = ""
    """The recipe's name (or the stem of the user's YAML file)."""
    task: Str = "causal_lm"
    """A registered task (`noble_cli.tasks`): it decides what `model` and `data` hold."""
    seed: Int = 0
    """Seeds the init and every draw of data, augmentation and dropout (each a function of the seed and position)."""
    name: Str = ""
    """A variant label; derived from `noble` when empty."""
    model: SerializeAsAny[ConfigModel] = Field(default_factory=ConfigModel)
    """The task's model config (its `Task.model_class`)."""
    data: SerializeAsAny[ConfigModel] = Field(default_factory=ConfigModel)
    """The task's data config (its `Task.data_class`)."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    noble: NobleConfig = Field(default_factory=NobleConfig)

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2^32), got {seed}")
        return seed

    @model_validator(mode="after")
    def _muon_needs_whole_matrices(self) -> RunConfig:
        if self.optim.name == "muon" and self.trainer.strategy == "fsdp":
            raise ValueError("optim.name muon cannot run under trainer.strategy fsdp: FSDP shards each weight into "
                             "a flat vector and Muon orthogonalizes whole matrices; valid with muon: auto, ddp")
        return self

    @property
    def variant(self) -> str:
        if self.name:
            return self.name
        tag = optimizer_label(self)
        return variant_label(self.noble) + (f" | {tag}" if tag else "")

    def to_dict(self) -> dict:
        """Plain JSON-compatible values (tuples as lists): what config.yaml, manifests and checkpoints hold."""
        return self.model_dump(mode="json")


SECTIONS = {"optim": OptimConfig, "schedule": ScheduleConfig, "trainer": TrainerConfig, "noble": NobleConfig}
TASK_SECTIONS = ("model", "data")  # the task's own config classes
TOP_LEVEL = ("recipe", "task", "seed", "name")


# --- errors as one line ---------------------------------------------------------------------------------------------
def config_error(error: ValidationError, cls: type[BaseModel], prefix: str = "") -> NobleError:
    """The first problem of a pydantic ValidationError as one line naming the field and what is valid."""
    e = error.errors()[0]
    loc = [str(p) for p in e["loc"] if not isinstance(p, int)]
    where = prefix + ".".join(loc)
    kind, value = e["type"], e.get("input")
    shown = "null" if value is None else repr(value)
    if kind == "value_error":
        return NobleError(str(e["ctx"]["error"]))
    if kind in ("noble_type", "noble_length"):
        return NobleError(f"{where} {e['msg']}")
    if kind == "extra_forbidden":
        parent = _field_class(cls, loc[:-1])
        if not prefix and len(loc) == 1:
            valid = list(SECTIONS) + list(TASK_SECTIONS) + list(TOP_LEVEL)
            return NobleError(f"unknown config section {loc[0]!r}; valid: {', '.join(valid)}")
        valid = sorted(parent.model_fields) if parent else []
        return NobleError(f"unknown key {where}; valid: {', '.join(valid)}")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return NobleError(f"config section {where} must be a mapping of keys, got {shown}")
    if kind == "literal_error":
        valid = e["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
        return NobleError(f"unknown {where} {value!r}; valid: {valid}")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return NobleError(f"{where} must be {_bounds(cls, loc)}, got {value}")
    for prefix_, name in (("int", "int"), ("float", "float"), ("finite", "float"), ("bool", "bool"),
                          ("string", "str"), ("tuple", "tuple"), ("list", "list")):
        if kind.startswith(prefix_):
            return NobleError(f"{where} must be of type {name}, got {shown}")
    return NobleError(f"{where}: {e['msg']}, got {shown}")


def _field_class(cls: type[BaseModel] | None, path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = cls.model_fields.get(part) if cls else None
        annotation = field.annotation if field else None
        cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return cls


def _bounds(cls: type[BaseModel], loc: list[str]) -> str:
    """A field's range from its constraints: `>= 1`, `> 0`, `in [0, 1)`."""
    parent = _field_class(cls, loc[:-1])
    field = parent.model_fields[loc[-1]] if parent and loc[-1] in parent.model_fields else None
    lo = hi = None
    for c in field.metadata if field else ():
        for attr, side in (("ge", "["), ("gt", "(")):
            if getattr(c, attr, None) is not None:
                lo = (side, getattr(c, attr))
        for attr, side in (("le", "]"), ("lt", ")")):
            if getattr(c, attr, None) is not None:
                hi = (side, getattr(c, attr))
    if lo and hi:
        return f"in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return "in range"


def validated(cls: type[BaseModel], values: Any, prefix: str = "") -> Any:
    """`cls` from a mapping, a validation error becoming one line (fields named with `prefix`, e.g. `model.`)."""
    if not isinstance(values, dict):
        raise NobleError(f"config section {prefix.rstrip('.')} must be a mapping of keys, got {values!r}")
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise config_error(e, cls, prefix) from None


# --- labels ---------------------------------------------------------------------------------------------------------
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
        if value != NobleConfig.model_fields[name].default:
            label += f" {fmt(value)}"
    # An explicit kernel is part of the label: `--kernel torch` vs `--kernel triton` is a wall-clock comparison,
    # and the two must not show up in a report as two rows of the same name.
    return label if n.kernel == "auto" or not has_fused_kernel(n.branch) else f"{label} [{n.kernel}]"


def optimizer_label(cfg: RunConfig) -> str:
    """The optimizer as labels name it: nothing for AdamW (the default; earlier runs' labels stay as they were),
    else `muon`, or `muon, branch muon` when NOBLE's branch matrices are on Muon too."""
    o = cfg.optim
    if o.name == "adamw":
        return ""
    return o.name + (f", branch {o.branch_optimizer}" if cfg.noble.enabled and o.branch_optimizer != "adamw" else "")


# --- identity -------------------------------------------------------------------------------------------------------
# Fields that change where or how fast a run goes, not what it computes: left out of the config hash.
_NOT_HASHED = {"trainer": ("devices", "num_nodes", "strategy", "accelerator", "num_workers", "log_every", "logger")}
# Renamed fields keep the name they had when their runs were hashed.
_HASHED_UNDER = {("trainer", "untimed_steps"): "kernel_warmup_steps"}


def _noble_identity(n: NobleConfig) -> dict:
    """The `noble` fields that change what a run computes. A plain baseline has no branch, so none of the others
    do: `--set noble.mix_lr_power=0` on a sweep must not make (and train) a second, identical baseline. A
    dense-matched baseline depends only on what its width is matched to, the init-only control only on its
    re-init (scale and layers)."""
    if n.enabled:
        d = _hashed_fields(n)
        if not has_fused_kernel(n.branch):  # a branch without fused kernels runs the torch path whatever is asked
            d["kernel"] = "auto"
        return d
    if n.dense_match:
        return {"branch": "none", "dense_match": True, "match_branch": n.match_branch, "rank": n.rank,
                "targets": n.targets}
    if n.init_only:  # the re-init alone: only its scale and the layers it touches
        return {"branch": "none", "init_only": True, "main_init_scale": n.main_init_scale, "targets": n.targets}
    return {"branch": "none"}


# Optimizer fields only Muon reads: an AdamW run's identity leaves them out, whatever their values, so a
# `--set optim.muon_lr=...` on a sweep does not fork (and train again) its AdamW runs.
_MUON_ONLY = ("branch_optimizer", "muon_lr", "muon_momentum", "muon_nesterov", "muon_ns_steps", "muon_weight_decay",
              "muon_adjust_lr_fn")


def _optim_identity(o: OptimConfig) -> dict:
    """The `optim` fields that change what a run computes. `branch_optimizer` is not among them: it acts on the
    branch only, so it is part of the branch's identity (`_branch_identity`), which keeps it out of the pair key:
    NOBLE with its branches on AdamW or on Muon pairs with the same Muon baseline."""
    d = _hashed_fields(o)
    for name in _MUON_ONLY if o.name == "adamw" else ("branch_optimizer",):
        d.pop(name, None)
    return d


def _branch_identity(cfg: RunConfig) -> dict:
    """`_noble_identity`, plus where the branch matrices are optimized when that is not the default (AdamW)."""
    d = _noble_identity(cfg.noble)
    if cfg.noble.enabled and cfg.optim.name == "muon" and cfg.optim.branch_optimizer != "adamw":
        d["branch_optimizer"] = cfg.optim.branch_optimizer
    return d


def _hashed_fields(section: BaseModel) -> dict:
    """A section's values as JSON, without the added fields that still have their defaults."""
    d = section.model_dump(mode="json")
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("added") and d.get(name) == _json(field.get_default(call_default_factory=True)):
            del d[name]
    return d


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def hashable_dict(cfg: RunConfig) -> dict:
    d = {name: getattr(cfg, name) for name in TOP_LEVEL}
    for section in (*TASK_SECTIONS, *SECTIONS):
        d[section] = _hashed_fields(getattr(cfg, section))
    for section, keys in _NOT_HASHED.items():
        for k in keys:
            d[section].pop(k, None)
    for (section, name), old in _HASHED_UNDER.items():
        d[section][old] = d[section].pop(name)
    d["optim"] = _optim_identity(cfg.optim)
    d["noble"] = _branch_identity(cfg)
    return d


def digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def config_hash(cfg: RunConfig) -> str:
    """Identity of a run's computation, seed included."""
    return digest(hashable_dict(cfg))


def pair_key(cfg: RunConfig, world_size: int = 1, data_identity: dict | None = None) -> str:
    """What a variant and its baseline share: everything but the branch, the seed and the label. `batch_size` is
    per device, so a run on several devices (known once the trainer is up) pairs only with the same world size;
    `data_identity` is what the data depends on beyond the config (the task module's `data_identity()`)."""
    d = hashable_dict(cfg)
    for k in ("noble", "seed", "name"):
        d.pop(k, None)
    if world_size != 1:
        d["world_size"] = int(world_size)
    if data_identity:
        d["data_identity"] = data_identity
    return digest(d)


def variant_key(cfg: RunConfig) -> str:
    return digest([_branch_identity(cfg), cfg.name])


def run_id(cfg: RunConfig) -> str:
    """A stable id: recipe, variant, seed and the config hash. The same config always maps to the same folder."""
    tag = optimizer_label(cfg)
    variant = cfg.name or (variant_label(cfg.noble, in_run_id=True) + (f" {tag}" if tag else ""))
    label = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in variant).strip("-")
    while "--" in label:
        label = label.replace("--", "-")
    return f"{cfg.recipe}-{label}-s{cfg.seed}-{config_hash(cfg)}"


def to_yaml(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return yaml.safe_dump(_json(obj), sort_keys=False)

"""The ablations: what each `noble ablate ...` sweep trains, expanded into resolved run configs.

A sweep is a list of *variants* (config overrides: the baseline, NOBLE settings, an optional dense-matched
baseline), crossed with seeds. Every seed gets the baseline its variants are compared with: the same config except
the `noble:` section (and, for the vision sweeps, with the same augmentation setting), so the report can pair them by
meta.json's `pair_key` and seed.

Conventions (see docs/sweeps.md):
- The baseline only sets `noble.branch=none` (and `noble.dense_match=false`). Its other `noble.*` fields do not
  enter its config hash (config._noble_identity), so the baseline of every language sweep on a recipe is one and the
  same run (one run id, trained once), even with a `--set noble.*` that only the branches see.
- A `--set` on a key that the sweep itself sets per run (the swept axis, `seed`, `name`, ...) is refused: it would
  silently turn every variant into the same run.
- The sweep name is `<ablation>-<recipe>-<hash>`; the hash covers what every run shares (recipe, `--set`,
  `--max-steps`, the fixed branch/rank) but not the axes (activation list, ranks, targets, augmentations, seeds,
  --dense-match, --controls): running the same sweep with more seeds or values keeps its name and is refused as a
  changed definition until `--force` is given.
- Controls (`--controls dense,init,own-init`, `--dense-match` = `--controls dense`) are added once per sweep (per
  augmentation setting in the vision sweeps), for its main NOBLE setting: the dense-matched baseline (widened to
  that setting's parameter count), the init-only control (no branch, the same main-weight re-init on the same
  layers: `noble.init_only`) and the branch with the model's own init (`noble.main_init_scale=null`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noble_cli import config as C
from noble_cli.errors import NobleError, choices_error
from noble_cli.parsing import parse_choices, split_list
from noble_cli.recipes import list_recipes, load_recipe, parse_set, recipe_task, resolve
from noble_cli.roles import (
    BASELINE,
    DENSE,
    INIT,
    NOBLE,
    OWN_INIT,
    role_of_config,
    sweep_role_matches,
)
from noble_cli.tasks import TASKS

# The paper's list (reference code's activations; cosnet first).
PAPER_ACTIVATIONS = ("cosnet", "cos", "gelu", "silu", "tanh", "leakyrelu", "gelu_net", "silu_net", "tanh_net",
                     "leakyrelu_net", "cos_net_double", "swiglu", "identity")
DEFAULT_RANKS = (16, 32, 64, 128)
LAYER_TARGETS = ("attn", "mlp", "all", "alternate")

# Vision augmentation fields: "none" turns every one of them off; each other setting turns one (or two) on.
AUGMENT_OFF: dict[str, Any] = {
    "data.mixup": False, "data.cutmix": False, "data.randaugment": False, "data.random_erasing": 0.0,
    "data.label_smoothing": 0.0, "model.drop_path": 0.0,
}
AUGMENTS = ("none", "mixup", "cutmix", "both", "randaugment", "random_erasing", "label_smoothing", "stochastic_depth")
_AUGMENT_ALIASES = {"mixup_cutmix": "both", "mixup+cutmix": "both", "drop_path": "stochastic_depth",
                    "erasing": "random_erasing", "off": "none"}

# Controls a sweep can add beside its main NOBLE setting (see `control_variants`).
CONTROLS = (DENSE, INIT, OWN_INIT)  # named as the roles of the runs they add
_CONTROL_ALIASES = {"dense-match": "dense", "dense-matched": "dense", "init-only": "init", "own": "own-init"}

SWEEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Variant:
    """One column of the grid: overrides on top of the recipe (dotted keys), before the seed is set."""

    role: str  # a run role of roles.py (baseline | noble | dense | init) or roles.OWN_INIT
    overrides: dict
    group: str = ""  # the setting this variant shares with its baseline (vision sweeps: the augmentation)


@dataclass
class PlannedRun:
    run_id: str
    cfg: C.RunConfig
    role: str
    group: str
    params_total: int | None = None
    params_branch: int | None = None

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def variant(self) -> str:
        return self.cfg.variant


@dataclass
class SweepPlan:
    ablation: str
    recipe: str
    name: str
    seeds: list[int]
    runs: list[PlannedRun]
    definition: dict  # the options that define the sweep, recorded in the manifest
    notes: list[str] = field(default_factory=list)

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.runs]


# --- parsing of the options -----------------------------------------------------------------------------------------
def parse_int_list(option: str, text: str, minimum: int = 0, example: str = "0,1,2") -> list[int]:
    """`0,1,2` -> [0, 1, 2] (ranges like `0-4` are accepted); duplicates dropped, order kept."""
    values: list[int] = []
    parts = split_list(text)
    if not parts:
        raise NobleError(f"{option} is empty; expected comma-separated integers, e.g. {example}")
    for part in parts:
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise NobleError(f"malformed {option} {text!r}: {part!r} is not an integer; expected comma-separated "
                             f"integers, e.g. {example}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise NobleError(f"malformed {option} {text!r}: empty range {part!r}; e.g. {example}")
        for v in range(lo, hi + 1):
            if v < minimum:
                raise NobleError(f"{option} value {v} is invalid; values must be >= {minimum}, e.g. {example}")
            if v not in values:
                values.append(v)
    return values


def parse_seeds(text: str) -> list[int]:
    return parse_int_list("--seeds", text, minimum=0, example="0,1,2")


def parse_activations(text: str) -> list[str]:
    """Names from the activation registry (aliases such as cos_net accepted), duplicates dropped."""
    from noble_cli.layers import ACTIVATIONS, resolve_activation

    names: list[str] = []
    parts = split_list(text)
    if not parts:
        raise NobleError(f"--activations is empty; valid: {', '.join(sorted(ACTIVATIONS))}")
    for part in parts:
        try:
            name = resolve_activation(part)
        except NobleError:
            raise choices_error("activation", part, list(ACTIVATIONS)) from None
        if name not in names:
            names.append(name)
    return names


def parse_branch(name: str) -> str:
    from noble_cli.layers import ACTIVATIONS, resolve_activation

    if name == "none":
        raise NobleError("--branch none is the baseline, which every sweep has already; valid: "
                         + ", ".join(sorted(ACTIVATIONS)))
    return resolve_activation(name)


def parse_targets(text: str) -> list[str]:
    from noble_cli.layers.apply import target_matcher

    parts = split_list(text, ";" if ";" in str(text) else ",")
    if not parts:
        raise NobleError(f"--targets is empty; valid: {', '.join(LAYER_TARGETS)} (separate glob sets with ';')")
    for p in parts:
        target_matcher(p)
    return list(dict.fromkeys(parts))


def parse_augments(text: str) -> list[str]:
    return parse_choices(text, AUGMENTS, "augmentation", aliases=_AUGMENT_ALIASES, required="--augments",
                         normalize=lambda s: s.lower().replace("-", "_").replace(" ", "_"))

def parse_optimizers(text: str, option: str = "--optimizers") -> list[str]:
    """`adamw,muon` -> the optimizers in that order, duplicates dropped."""
    return parse_choices(text, C.OPTIMIZERS, "optimizer", required=option)


def parse_controls(text: str | None) -> list[str]:
    """`dense,init,own-init` -> the controls in that order (aliases: dense-match, init-only; `none` or empty:
    no control)."""
    return parse_choices(text, CONTROLS, "control", aliases=_CONTROL_ALIASES, skip=("none",),
                         normalize=lambda s: s.lower().replace("_", "-"))


def check_sweep_name(name: str) -> str:
    if not SWEEP_NAME.match(name):
        raise NobleError(f"sweep name {name!r} is invalid; use letters, digits, '.', '_' and '-' (at most 100, "
                         "starting with a letter or digit)")
    return name


# --- recipes --------------------------------------------------------------------------------------------------------
def recipe_label(recipe: str) -> str:
    """The recipe's name as runs record it: a recipe name, or the stem of a YAML path."""
    return str(load_recipe(recipe).get("recipe") or Path(recipe).stem)


def augmentation_tasks() -> list[str]:
    """The tasks whose data has the augmentation switches these sweeps turn (they declare the --mixup flag)."""
    return [name for name, entry in TASKS.items() if any(f.name == "mixup" for f in entry.flags)]


def vision_recipes() -> list[str]:
    out = []
    for name in list_recipes():
        try:
            if load_recipe(name).get("task") in augmentation_tasks():
                out.append(name)
        except NobleError:
            continue
    return out


def require_vision(ablation: str, recipe: str | None, sets: list[str]) -> str:
    available, tasks = vision_recipes(), ", ".join(augmentation_tasks())
    hint = f"vision recipes: {', '.join(available)}" if available else "no vision recipe is installed yet"
    if not recipe:
        raise NobleError(f"`noble ablate {ablation}` needs a vision recipe (task {tasks}): pass --recipe NAME; "
                         f"{hint}")
    task = recipe_task(recipe, sets)
    if task not in augmentation_tasks():
        raise NobleError(f"`noble ablate {ablation}` is for vision recipes (task {tasks}), but recipe {recipe!r} "
                         f"has task {task!r}; {hint}")
    return recipe


# --- expansion ------------------------------------------------------------------------------------------------------
def _check_sets(sets: list[str], reserved: set[str], ablation: str) -> None:
    hints = {"seed": "use --seeds", "trainer.max_steps": "use --max-steps",
             "noble.branch": "use --activations (or --branch)",
             "noble.rank": "use --rank (or --ranks)", "noble.targets": "use --targets",
             "name": "labels come from the variant", "optim.name": "use --optimizers",
             "optim.branch_optimizer": "use --branch-optimizers"}
    for s in sets:
        path, _ = parse_set(s)
        key = ".".join(path)
        if key in reserved or key == "name":
            hint = hints.get(key, "it is part of what the sweep varies")
            raise NobleError(f"--set {key}=... conflicts with `noble ablate {ablation}`, which sets {key} per run; "
                             f"{hint}")


def expand(ablation: str, recipe: str, variants: list[Variant], seeds: list[int], max_steps: int | None,
           sets: list[str], name: str | None, name_params: dict, axes: dict, check_models: bool = True,
           label_groups: bool = False) -> SweepPlan:
    """Variants x seeds -> resolved configs, in seed-major order (seed 0's full comparison first)."""
    sets = list(sets or [])
    if max_steps is not None and max_steps < 1:
        raise NobleError(f"--max-steps must be >= 1, got {max_steps}")
    common: dict[str, Any] = {}
    if max_steps is not None:
        common["trainer.max_steps"] = max_steps
    reserved = {"seed", *common}
    for v in variants:
        reserved.update(v.overrides)
    _check_sets(sets, reserved, ablation)

    label = recipe_label(recipe)
    notes: list[str] = []
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    params: dict[str, tuple[int, int]] = {}
    for seed in seeds:
        for v in variants:
            overrides = {**common, **v.overrides, "seed": seed}
            # resolve() skips None overrides (an unset option): a null the sweep means goes in as a --set
            nulls = [f"{k}=null" for k, value in overrides.items() if value is None]
            if v.role == INIT and resolve(recipe, {**overrides, "noble.init_only": False},
                                              nulls + sets).noble.main_init_scale is None:
                # NOBLE keeps the model's init here (noble.main_init_scale: null): nothing to control for
                if seed == seeds[0]:
                    notes.append("the init control is left out: noble.main_init_scale is null, so NOBLE does not "
                                 "re-initialise the main weights and the control would be the baseline")
                continue
            cfg = resolve(recipe, overrides, nulls + sets)
            if label_groups and v.group:
                cfg.name = f"{cfg.variant} | {v.group}"
            rid = C.run_id(cfg)
            if rid in seen:  # e.g. two spellings of one activation
                if v.role in (DENSE, INIT, OWN_INIT) and seed == seeds[0]:
                    notes.append(f"the {v.role} control is the same run as another of the sweep ({cfg.variant}): "
                                 "left out")
                continue
            seen.add(rid)
            if not sweep_role_matches(v.role, cfg):  # a variant's overrides and its role disagree: a bug here
                raise AssertionError(f"sweep variant {cfg.variant!r} was built as {v.role!r} but resolves to a "
                                     f"{role_of_config(cfg)!r} run")
            run = PlannedRun(rid, cfg, v.role, v.group)
            if check_models:
                key = C.digest([C.pair_key(cfg), C.variant_key(cfg)])
                if key not in params:
                    params[key] = model_params(cfg)
                run.params_total, run.params_branch = params[key]
            runs.append(run)

    shared = {"ablation": ablation, "recipe": recipe, "sets": sets, "max_steps": max_steps, **name_params}
    sweep_name = check_sweep_name(name) if name else f"{ablation}-{label}-{C.digest(shared, 6)}"
    definition = {"ablation": ablation, "recipe": recipe, "seeds": seeds, "max_steps": max_steps, "sets": sets,
                  **name_params, **axes}
    return SweepPlan(ablation, label, sweep_name, list(seeds), runs, definition, notes)


def model_params(cfg: C.RunConfig) -> tuple[int | None, int | None]:
    """(total, branch) parameters, built on the meta device: catches a rank too large for the model, for free.

    A NobleError (an invalid rank, ...) is the user's; any other failure to build on the meta device only costs
    the parameter count, never the sweep: (None, None).
    """
    from noble_cli.recipes import count_recipe_params

    try:
        return count_recipe_params(cfg)
    except NobleError:
        raise
    except ImportError as e:
        raise NobleError(f"task {cfg.task!r} cannot be loaded ({e}); valid tasks are those installed") from None
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device
        return None, None


def _baseline() -> Variant:
    return Variant(BASELINE, {"noble.branch": "none", "noble.dense_match": False, "noble.init_only": False})


def _noble(branch: str, rank: int | None, targets: str | None = None, group: str = "", extra: dict | None = None,
           role: str = NOBLE) -> Variant:
    ov: dict[str, Any] = {"noble.branch": branch, "noble.dense_match": False, "noble.init_only": False}
    if rank is not None:
        ov["noble.rank"] = rank
    if targets is not None:
        ov["noble.targets"] = targets
    return Variant(role, {**ov, **(extra or {})}, group)


def _dense(branch: str, rank: int | None, group: str = "", extra: dict | None = None) -> Variant:
    ov: dict[str, Any] = {"noble.branch": "none", "noble.dense_match": True, "noble.match_branch": branch,
                          "noble.init_only": False}
    if rank is not None:
        ov["noble.rank"] = rank
    return Variant(DENSE, {**ov, **(extra or {})}, group)


def control_variants(controls: list[str], branch: str, rank: int | None, group: str = "",
                     extra: dict | None = None) -> list[Variant]:
    """The controls of the main NOBLE setting (`branch` at `rank` on the recipe's targets), in the order asked:
    - dense: the baseline widened (MLP) to that setting's parameter count: is a speedup more than "more parameters"?
    - init: no branch, the targeted layers' main weights re-initialised as NOBLE re-initialises them
      (noble.init_only, at the recipe's noble.main_init_scale): is a speedup more than the init change?
    - own-init: the branch with the model's own init (noble.main_init_scale=null): the branch alone."""
    made = {
        "dense": lambda: _dense(branch, rank, group, extra),
        "init": lambda: Variant(INIT, {"noble.branch": "none", "noble.dense_match": False, "noble.init_only": True,
                                         **(extra or {})}, group),
        "own-init": lambda: _noble(branch, rank, group=group, extra={**(extra or {}), "noble.main_init_scale": None},
                                   role=OWN_INIT),
    }
    return [made[c]() for c in controls]


def _with_dense(controls: list[str] | None, dense_match: bool) -> list[str]:
    """`--dense-match` is `--controls dense` (kept first, where it always was)."""
    controls = list(controls or [])
    if dense_match and "dense" not in controls:
        controls.insert(0, "dense")
    return controls


def activations_sweep(recipe: str, activations: list[str], seeds: list[int], rank: int | None = None,
                      dense_match: bool = False, max_steps: int | None = None, sets: list[str] | None = None,
                      name: str | None = None, check_models: bool = True, controls: list[str] | None = None
                      ) -> SweepPlan:
    """Baseline + one NOBLE run per activation at one rank (`--rank`, else the recipe's); optionally the controls
    of CosNet at that rank (`controls`; `dense_match` adds the dense-matched one)."""
    controls = _with_dense(controls, dense_match)
    variants = [_baseline()] + [_noble(a, rank) for a in activations] + control_variants(controls, "cosnet", rank)
    return expand("activations", recipe, variants, seeds, max_steps, sets or [], name, {"rank": rank},
                  {"activations": activations, "dense_match": "dense" in controls, "controls": controls},
                  check_models)


def ranks_sweep(recipe: str, ranks: list[int] | None, seeds: list[int], branch: str = "cosnet",
                dense_match: bool = False, max_steps: int | None = None, sets: list[str] | None = None,
                name: str | None = None, check_models: bool = True, controls: list[str] | None = None
                ) -> SweepPlan:
    """Baseline + NOBLE at each rank. Without --ranks, the paper's 16,32,64,128, keeping those the model allows."""
    controls = _with_dense(controls, dense_match)
    notes: list[str] = []
    _check_sets(sets or [], {"seed", "noble.branch", "noble.rank", "noble.dense_match"}, "ranks")
    if ranks is None:
        ranks, too_big = [], []
        for r in DEFAULT_RANKS:
            cfg = resolve(recipe, {"noble.branch": branch, "noble.rank": r}, sets)
            try:
                model_params(cfg)
                ranks.append(r)
            except NobleError:
                too_big.append(r)
        if too_big:
            notes.append(f"default ranks {', '.join(map(str, too_big))} left out: too large for {recipe}'s layers")
        if not ranks:
            raise NobleError(f"none of the default ranks {', '.join(map(str, DEFAULT_RANKS))} fits recipe {recipe}; "
                             "pass --ranks with smaller values")
    recipe_rank = resolve(recipe, {}, sets).noble.rank
    dense_rank = recipe_rank if recipe_rank in ranks else max(ranks)
    variants = [_baseline()] + [_noble(branch, r) for r in ranks] + control_variants(controls, branch, dense_rank)
    if controls and dense_rank != recipe_rank:
        notes.append(f"the controls ({', '.join(controls)}) are those of {branch} r{dense_rank} (the recipe's rank "
                     f"{recipe_rank} is not swept; the largest swept rank is used)")
    plan = expand("ranks", recipe, variants, seeds, max_steps, sets or [], name, {"branch": branch},
                  {"ranks": ranks, "dense_match": "dense" in controls, "controls": controls}, check_models)
    plan.notes = notes + plan.notes
    return plan


def layers_sweep(recipe: str, targets: list[str], seeds: list[int], branch: str = "cosnet", rank: int | None = None,
                 dense_match: bool = False, max_steps: int | None = None, sets: list[str] | None = None,
                 name: str | None = None, check_models: bool = True, controls: list[str] | None = None
                 ) -> SweepPlan:
    """Baseline + NOBLE on each set of layers (attn, mlp, all, alternate, or glob patterns); the controls are those
    of the branch on the recipe's targets."""
    controls = _with_dense(controls, dense_match)
    variants = [_baseline()] + [_noble(branch, rank, t) for t in targets] + control_variants(controls, branch, rank)
    return expand("layers", recipe, variants, seeds, max_steps, sets or [], name, {"branch": branch, "rank": rank},
                  {"targets": targets, "dense_match": "dense" in controls, "controls": controls}, check_models)


def mixup_sweep(recipe: str, seeds: list[int], branch: str = "cosnet", rank: int | None = None,
                max_steps: int | None = None, sets: list[str] | None = None, name: str | None = None,
                check_models: bool = True, controls: list[str] | None = None) -> SweepPlan:
    """Baseline and NOBLE (and the controls), each with Mixup+CutMix on and off (the paper's ViT finding)."""
    sets = sets or []
    controls = list(controls or [])
    require_vision("mixup", recipe, sets)
    variants = []
    for group, on in (("mixup+cutmix on", True), ("mixup+cutmix off", False)):
        extra = {"data.mixup": on, "data.cutmix": on}
        variants.append(Variant(BASELINE, {**_baseline().overrides, **extra}, group))
        variants.append(_noble(branch, rank, group=group, extra=extra))
        variants += control_variants(controls, branch, rank, group, extra)
    return expand("mixup", recipe, variants, seeds, max_steps, sets, name, {"branch": branch, "rank": rank},
                  {"controls": controls} if controls else {}, check_models, label_groups=True)


def augment_sweep(recipe: str, augments: list[str], seeds: list[int], branch: str = "cosnet",
                  rank: int | None = None, random_erasing: float = 0.25, label_smoothing: float = 0.1,
                  drop_path: float = 0.1, max_steps: int | None = None, sets: list[str] | None = None,
                  name: str | None = None, check_models: bool = True, controls: list[str] | None = None
                  ) -> SweepPlan:
    """Baseline and NOBLE (and the controls) under each augmentation alone ("none" = all off); Mixup/CutMix alphas
    stay the recipe's."""
    sets = sets or []
    controls = list(controls or [])
    require_vision("augment", recipe, sets)
    for opt, v in (("--random-erasing", random_erasing), ("--label-smoothing", label_smoothing)):
        if not 0 < v < 1:
            raise NobleError(f"{opt} must be in (0, 1), got {v}")
    if not 0 < drop_path < 1:
        raise NobleError(f"--drop-path must be in (0, 1), got {drop_path}")
    on = {
        "none": {}, "mixup": {"data.mixup": True}, "cutmix": {"data.cutmix": True},
        "both": {"data.mixup": True, "data.cutmix": True}, "randaugment": {"data.randaugment": True},
        "random_erasing": {"data.random_erasing": random_erasing},
        "label_smoothing": {"data.label_smoothing": label_smoothing},
        "stochastic_depth": {"model.drop_path": drop_path},
    }
    variants = []
    for aug in augments:
        extra = {**AUGMENT_OFF, **on[aug]}
        variants.append(Variant(BASELINE, {**_baseline().overrides, **extra}, aug))
        variants.append(_noble(branch, rank, group=aug, extra=extra))
        variants += control_variants(controls, branch, rank, aug, extra)
    return expand("augment", recipe, variants, seeds, max_steps, sets, name,
                  {"branch": branch, "rank": rank, "random_erasing": random_erasing,
                   "label_smoothing": label_smoothing, "drop_path": drop_path},
                  {"augments": augments, **({"controls": controls} if controls else {})}, check_models,
                  label_groups=True)


def controls_sweep(recipe: str, seeds: list[int], branch: str = "cosnet", rank: int | None = None,
                   max_steps: int | None = None, sets: list[str] | None = None, name: str | None = None,
                   check_models: bool = True) -> SweepPlan:
    """Is a NOBLE speedup the branch's? Baseline, NOBLE (`branch` at `rank`, else the recipe's), and its three
    controls: dense-matched, init-only, and the branch with the model's own init."""
    variants = [_baseline(), _noble(branch, rank)] + control_variants(list(CONTROLS), branch, rank)
    return expand("controls", recipe, variants, seeds, max_steps, sets or [], name, {"branch": branch, "rank": rank},
                  {"controls": list(CONTROLS)}, check_models)


def optimizers_sweep(recipe: str, optimizers: list[str], seeds: list[int], branch: str = "cosnet",
                     rank: int | None = None, branch_optimizers: list[str] | None = None, max_steps: int | None = None,
                     sets: list[str] | None = None, name: str | None = None, check_models: bool = True,
                     controls: list[str] | None = None) -> SweepPlan:
    """Does NOBLE's speedup survive a stronger optimizer? Baseline and NOBLE (and the controls) under each optimizer
    (`optim.name`), each optimizer its own comparison: the optim section is part of the pair key, so every NOBLE
    run is measured against the baseline of its own optimizer. Under Muon, one NOBLE run per branch optimizer
    (`branch_optimizers`, default adamw): both pair with the same Muon baseline. No run is renamed: the AdamW runs
    are the very runs of the other studies on the recipe (trained once), and labels name Muon (`| muon`); the report
    adds `| adamw` where a recipe's runs mix optimizers."""
    sets = sets or []
    controls = list(controls or [])
    branch_optimizers = list(branch_optimizers or ["adamw"])
    if "muon" not in optimizers and branch_optimizers != ["adamw"]:
        raise NobleError("--branch-optimizers places the branch matrices of Muon runs, and --optimizers has no muon; "
                         "valid: add muon to --optimizers, or leave --branch-optimizers at adamw")
    variants = []
    for opt in optimizers:
        extra = {"optim.name": opt}
        variants.append(Variant(BASELINE, {**_baseline().overrides, **extra}, opt))
        for bo in branch_optimizers if opt == "muon" else ["adamw"]:
            variants.append(_noble(branch, rank, group=opt, extra={**extra, "optim.branch_optimizer": bo}))
        variants += control_variants(controls, branch, rank, opt, extra)
    axes = {"optimizers": optimizers, "branch_optimizers": branch_optimizers, "controls": controls}
    return expand("optimizers", recipe, variants, seeds, max_steps, sets, name, {"branch": branch, "rank": rank},
                  axes, check_models)

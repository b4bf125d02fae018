"""What a run is in a comparison, derived in one place from its noble settings.

A run's role is a function of three settings and nothing else:

    noble.branch != none                  -> "noble"     (a branch)
    noble.dense_match                     -> "dense"     (the baseline widened to a branch's parameter count)
    noble.init_only                       -> "init"      (no branch, the main weights re-initialised as NOBLE does)
    otherwise                             -> "baseline"

`noble train` writes it to meta.json (`role_of_config`); `noble report` reads it back, and derives it the same way
for folders written before meta.json carried it (`role_of_saved`); a sweep's planner checks that every variant it
plans has the role it was built for (`sweep_role_matches`). A sweep knows one more name: "own-init", a branch run
with the model's own init, whose run role is "noble" (it is told apart by its label and its config, not its role).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

BASELINE, NOBLE, DENSE, INIT = "baseline", "noble", "dense", "init"
RUN_ROLES = (BASELINE, NOBLE, DENSE, INIT)

# The controls a NOBLE row is also compared with, and how reports name them.
CONTROL_ROLES = {DENSE: "the dense-matched control", INIT: "the init-only control"}

# A sweep's own name for a role: the branch with the model's own init is a "noble" run.
OWN_INIT = "own-init"


def role_of(branch: str, dense_match: bool, init_only: bool) -> str:
    """The role of a run with these settings (the table in the module docstring)."""
    if str(branch).lower() != "none":
        return NOBLE
    return DENSE if dense_match else INIT if init_only else BASELINE


def role_of_config(cfg: Any) -> str:
    """The role of a resolved RunConfig."""
    n = cfg.noble
    return role_of(n.branch, n.dense_match, n.init_only)


def role_of_saved(meta: Mapping, config: Mapping | None, is_baseline: bool) -> str:
    """A run folder's role: meta.json's; for folders written before it was recorded, from `is_baseline` (meta.json
    has always had it) and the saved config's noble section, else the variant label (`dense-matched(...)`,
    `init-only(...)`). A folder that is not the baseline and is neither control is a branch run."""
    role = str(meta.get("role") or "")
    if role in RUN_ROLES:
        return role
    if is_baseline:
        return BASELINE
    noble = (config or {}).get("noble")
    noble = noble if isinstance(noble, Mapping) else {}
    label = str(meta.get("variant") or "")
    if noble.get("dense_match") or label.startswith("dense-matched("):
        return DENSE
    if noble.get("init_only") or label.startswith("init-only("):
        return INIT
    return NOBLE


def sweep_role_matches(sweep_role: str, cfg: Any) -> bool:
    """Whether a run a sweep planned as `sweep_role` has that role once its config is resolved."""
    return role_of_config(cfg) == (NOBLE if sweep_role == OWN_INIT else sweep_role)

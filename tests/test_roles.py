"""A run's role (baseline / noble / dense / init) is derived in one place: noble_cli/roles.py."""

from __future__ import annotations

import pytest

from noble_cli import recipes
from noble_cli.roles import role_of, role_of_config, role_of_saved, sweep_role_matches
from noble_cli.sweep import grids


@pytest.mark.parametrize("branch, dense, init, role", [
    ("cosnet", False, False, "noble"), ("None", False, False, "baseline"), ("none", True, False, "dense"),
    ("none", False, True, "init"), ("cos", True, True, "noble"),  # a branch is a branch whatever else is set
])
def test_role_of_the_three_settings(branch, dense, init, role):
    assert role_of(branch, dense, init) == role


def test_resolved_configs_have_the_roles_their_overrides_say():
    cases = {"noble": {"noble.branch": "cosnet"}, "baseline": {"noble.branch": "none"},
             "dense": {"noble.branch": "none", "noble.dense_match": True, "noble.match_branch": "cosnet"},
             "init": {"noble.branch": "none", "noble.init_only": True}}
    for role, overrides in cases.items():
        assert role_of_config(recipes.resolve("llm-tiny", overrides)) == role


def test_saved_role_is_metas_and_older_folders_fall_back_to_config_then_label():
    assert role_of_saved({"role": "dense", "variant": "init-only(x)"}, None, False) == "dense"  # meta wins
    assert role_of_saved({"role": "bogus"}, None, True) == "baseline"
    assert role_of_saved({}, {"noble": {"branch": "none", "init_only": True}}, False) == "init"
    assert role_of_saved({"variant": "dense-matched(cosnet r8)"}, {"noble": "not a dict"}, False) == "dense"
    assert role_of_saved({"variant": "init-only(main-init 0.5)"}, None, False) == "init"
    assert role_of_saved({"variant": "cosnet r8"}, None, False) == "noble"


def test_every_variant_a_sweep_plans_has_the_role_it_was_built_for():
    plan = grids.controls_sweep("llm-tiny", [0], check_models=False)
    assert [r.role for r in plan.runs] == ["baseline", "noble", "dense", "init", "own-init"]
    assert all(sweep_role_matches(r.role, r.cfg) for r in plan.runs)
    assert role_of_config(plan.runs[-1].cfg) == "noble"  # own-init is a branch run with the model's own init


def test_a_variant_whose_overrides_contradict_its_role_is_caught_when_planned():
    wrong = grids.Variant("dense", {"noble.branch": "cosnet", "noble.dense_match": False, "noble.init_only": False})
    with pytest.raises(AssertionError, match="built as 'dense' but resolves to a 'noble' run"):
        grids.expand("controls", "llm-tiny", [wrong], [0], 10, [], None, {}, {}, check_models=False)

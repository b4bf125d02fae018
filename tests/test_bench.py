"""`noble bench layer` and `noble bench step` run end to end on tiny shapes and write well-formed JSON.

Not a timing test: it never compares speeds. On a CPU the Triton variants run in Triton's interpreter
(TRITON_INTERPRET=1 is set below, before any kernel is decorated), so they are exercised end to end too.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from typer.testing import CliRunner  # noqa: E402

from noble_cli.bench import bench_app, branch_flops_ratio, triton_skip_reason  # noqa: E402

runner = CliRunner()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run(args):
    result = runner.invoke(bench_app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _check_rows(rows, variants):
    assert {r["variant"] for r in rows} == set(variants)
    skip = triton_skip_reason(DEVICE)
    for r in rows:
        if r["variant"].startswith("noble-triton") and skip:
            assert r["skipped"] == skip and r["ms"] is None
            continue
        assert r["skipped"] is None, r
        assert r["ms"] > 0
        if r["variant"] != "baseline":
            assert r["overhead"] is not None and r["overhead"] > -1


def test_branch_flops_ratio():
    # llm-250m fc at r=64: (64*1024 + 64*64 + 64*4096) / (1024*4096)
    assert branch_flops_ratio(1024, 4096, 64) == pytest.approx((64 * 1024 + 64 * 64 + 64 * 4096) / (1024 * 4096))


def test_bench_layer_json(tmp_path):
    out = tmp_path / "layer.json"
    variants = ["baseline", "noble-torch", "noble-triton", "noble-triton-cublas"]
    _run(["layer", "--tokens", "40", "--shapes", "qkv:24x40", "--ranks", "4,50", "--warmup", "0", "--iters", "1",
          "--device", DEVICE.type, "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("kind", "device", "date", "versions", "precision", "tokens", "rows"):
        assert key in data
    assert data["kind"] == "layer" and data["tokens"] == 40
    rows = [r for r in data["rows"] if r["rank"] != 50]
    _check_rows(rows, variants)
    for r in rows:
        assert {"shape", "in", "out", "rank", "mode", "flop_ratio", "peak_mem_mb"} <= set(r)
        if r["variant"] != "baseline":
            assert r["flop_ratio"] == pytest.approx(branch_flops_ratio(24, 40, 4))
    # rank 50 >= min(in, out): reported as skipped, not an error
    assert all(r["skipped"].startswith("rank 50") for r in data["rows"] if r["rank"] == 50)


def test_bench_step_json(tmp_path):
    out = tmp_path / "step.json"
    variants = ["baseline", "noble-torch", "noble-triton"]
    # one augmented layer keeps the Triton interpreter (CPU) quick; a small vocabulary keeps the LM head cheap
    _run(["step", "--recipe", "llm-tiny", "--batch-size", "1", "--seq-len", "16", "--targets", "blocks.0.mlp.fc",
          "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.vocab_size=256",
          "--warmup", "0", "--iters", "1",
          "--variants", ",".join(variants), "--device", DEVICE.type, "--out", str(out)])
    data = json.loads(out.read_text())
    for key in ("kind", "recipe", "task", "device", "precision", "batch_size", "seq_len", "rank", "rows"):
        assert key in data
    assert data["kind"] == "step" and data["recipe"] == "llm-tiny" and data["batch_size"] == 1
    _check_rows(data["rows"], variants)
    ran = {r["variant"]: r for r in data["rows"] if r["ms"] is not None}
    for r in ran.values():
        assert r["params"] > 0 and r["flops_per_step"] > 0
    assert ran["noble-torch"]["params"] > ran["baseline"]["params"]
    assert ran["noble-torch"]["flop_overhead"] > 0


def test_bench_step_rejects_unknown_variant(tmp_path):
    result = runner.invoke(bench_app, ["step", "--recipe", "llm-tiny", "--variants", "baseline,nope",
                                       "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0
    assert "unknown variant 'nope'" in str(result.exception)


def test_bench_step_refuses_fused_variants_for_other_branches_before_timing(tmp_path):
    result = runner.invoke(bench_app, ["step", "--recipe", "llm-tiny", "--branch", "gelu_net",
                                       "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0
    assert "need --branch cosnet" in str(result.exception) and "not gelu_net" in str(result.exception)
    assert not (tmp_path / "x.json").exists()
    result = runner.invoke(bench_app, ["step", "--recipe", "llm-tiny", "--branch", "none", "--variants",
                                       "baseline,noble-torch", "--out", str(tmp_path / "x.json")])
    assert "baseline against itself" in str(result.exception)


def test_bench_layer_writes_its_json_after_every_row(tmp_path, monkeypatch):
    """A command cut off after its first row keeps that row (complete: false); a finished one says complete."""
    import noble_cli.bench.layer as L

    real = L.layer_rows

    def cut_after_one(*args, **kwargs):
        rows = real(*args, **kwargs)
        yield next(rows)
        raise RuntimeError("cut off")

    monkeypatch.setattr(L, "layer_rows", cut_after_one)
    out = tmp_path / "layer.json"
    with pytest.raises(RuntimeError, match="cut off"):
        runner.invoke(bench_app, ["layer", "--tokens", "16", "--shapes", "q:16x24", "--ranks", "4", "--variants",
                                  "baseline,noble-torch", "--warmup", "0", "--iters", "1", "--device", "cpu",
                                  "--out", str(out)], catch_exceptions=False)
    data = json.loads(out.read_text())
    assert data["complete"] is False and [r["variant"] for r in data["rows"]] == ["baseline"]
    monkeypatch.setattr(L, "layer_rows", real)
    _run(["layer", "--tokens", "16", "--shapes", "q:16x24", "--ranks", "4", "--variants", "baseline,noble-torch",
          "--warmup", "0", "--iters", "1", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["complete"] is True and len(data["rows"]) == 2


@pytest.mark.parametrize("recipe, sets", [
    ("vqgan-tiny", ["model.n_layer=1", "model.n_layer_decoder=1", "model.d_model=32"]),  # a GAN: two optimizers
    ("llm-tiny", ["model.n_layer=1", "model.d_model=32", "model.vocab_size=256", "optim.name=muon"]),
])
def test_bench_step_times_every_task_with_its_own_optimizer(tmp_path, recipe, sets):
    """`noble bench step` builds each variant's optimizer as training does: a VQGAN (whose configure_optimizers
    returns the discriminator's too) and a Muon run both time, with the optimizer named in the header."""
    out = tmp_path / "step.json"
    args = ["step", "--recipe", recipe, "--batch-size", "2", "--warmup", "0", "--iters", "1",
            "--variants", "baseline,noble-torch", "--device", "cpu", "--out", str(out), "--no-compile"]
    for s in sets:
        args += ["--set", s]
    _run(args)
    data = json.loads(out.read_text())
    assert all(r["ms"] is not None and not r.get("skipped") for r in data["rows"]), data["rows"]
    assert data["optimizer"] == ("muon" if "optim.name=muon" in sets else "adamw")

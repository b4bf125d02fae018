"""The one decision of which implementation a NOBLE branch runs (noble_cli/layers/implementation.py) and the
self-check of the fused kernels before a run's first step (noble_cli/train/kernel_check.py).

Faults are injected by swapping `noble_kernels.cosnet_linear` (what NobleLinear calls) for one that raises or
returns wrong values. On the CPU the real kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before any
kernel is decorated). `auto` plans the fused path on CUDA only, so the fallback tests plan as if on CUDA while the
kernels run in the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from noble_cli import recipes  # noqa: E402
from noble_cli.layers import implementation as impl  # noqa: E402
from noble_cli.layers import selfcheck  # noqa: E402
from noble_cli.layers.selfcheck import LayerShape  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_fused = pytest.mark.skipif(impl.fused_unavailable_reason(DEVICE) is not None,
                                 reason=f"fused kernels cannot run on {DEVICE} here")

# One block, CosNet on fc and fc2 only (in < out and in > out), three steps: seconds in the interpreter.
SETS = ["model.d_model=16", "model.n_head=2", "model.n_layer=1", "model.block_size=16", "data.seq_len=16",
        "trainer.batch_size=2", "trainer.eval_batches=1", "trainer.eval_every=3", "trainer.max_steps=3",
        "schedule.warmup_steps=1", "optim.lr=1e-2", "noble.branch=cosnet", "noble.rank=4", "noble.targets=mlp",
        "noble.up_init_scale=1.0", "trainer.log_every=1"]


@pytest.fixture(autouse=True)
def fresh_verdicts():
    selfcheck.clear_cache()
    yield
    selfcheck.clear_cache()


def _fault(monkeypatch, kind: str) -> None:
    nk = impl.import_noble_kernels()
    real = nk.cosnet_linear

    def raising(*args, **kwargs):
        raise RuntimeError("injected kernel failure\nsecond line of a long compiler message")

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.5

    class _DoubleGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    def wrong_grad(x, *args, **kwargs):  # right output, wrong input gradient
        return real(_DoubleGrad.apply(x), *args, **kwargs)

    monkeypatch.setattr(nk, "cosnet_linear", {"raise": raising, "wrong": wrong, "wrong_grad": wrong_grad}[kind])


# ---------------------------------------------------------------------------------------------------------------
# The plan

def test_plan_decides_from_branch_request_and_device(monkeypatch):
    p = impl.plan
    assert p("none", "auto", "cuda").kernel == "torch" and "no NOBLE branch" in p("none", "auto", "cuda").reason
    gelu = p("gelu_net", "triton", "cuda")
    assert gelu.kernel == "torch" and "cosnet branch only, not gelu_net" in gelu.reason
    assert p("cosnet", "torch", "cuda").kernel == "torch"
    auto_cpu = p("cosnet", "auto", "cpu")
    assert auto_cpu.kernel == "torch" and not auto_cpu.pending and "CUDA only" in auto_cpu.reason
    on_cuda = p("cosnet", "auto", "cuda")
    assert on_cuda.kernel == "triton" and on_cuda.pending
    assert p("cosnet", "triton", "cuda").pending
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    off = p("cosnet", "triton", "cpu")
    assert off.kernel == "torch" and "TRITON_INTERPRET" in off.reason
    assert off.meta() == {"kernel": "torch", "kernel_requested": "triton", "kernel_reason": off.reason}
    with pytest.raises(ValueError, match="valid: auto, torch, triton"):
        p("cosnet", "cuda", "cuda")


def test_noble_kernels_load_from_a_source_checkout_that_is_not_installed():
    """With `import noble_kernels` failing (not pip-installed), the loader takes kernels/ of this checkout, and a
    NobleLinear's fused path runs from it."""
    code = (
        "import sys, torch\n"
        "sys.modules['noble_kernels'] = None  # `import noble_kernels` raises ImportError, as when not installed\n"
        "from noble_cli.layers import NobleLinear\n"
        "from noble_cli.layers.implementation import import_noble_kernels, runs_fused\n"
        "nk = import_noble_kernels()\n"
        "layer = NobleLinear(16, 24, rank=3, kernel='triton')\n"
        "x = torch.randn(5, 16)\n"
        "assert runs_fused(layer.kernel, layer.activation, x)\n"
        "layer(x).sum().backward()\n"
        "print(nk.__file__)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.strip()).resolve() == (ROOT / "kernels" / "__init__.py").resolve()


# ---------------------------------------------------------------------------------------------------------------
# The check of one shape

SHAPE = LayerShape(16, 24, 3, bias=True)


@needs_fused
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_real_kernels_pass(precision):
    result = selfcheck.check_shape(SHAPE, DEVICE, precision, tokens=40)
    assert result.ok, result.error
    # the output, x and all 11 parameters of a biased CosNet layer were compared
    assert len(result.errors) == 13 and all(result.errors[k] <= result.tolerance[k] for k in result.errors)


@needs_fused
@pytest.mark.parametrize("kind, message", [
    ("raise", "RuntimeError: injected kernel failure"),
    ("wrong", "y differs from the reference"),
    ("wrong_grad", "x differs from the reference"),
])
def test_faults_fail_the_check(monkeypatch, kind, message):
    _fault(monkeypatch, kind)
    result = selfcheck.check_shape(SHAPE, DEVICE, "32-true", tokens=40)
    assert not result.ok and message in result.error and "\n" not in result.error


@needs_fused
def test_the_check_leaves_the_random_state_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert selfcheck.check_shape(SHAPE, DEVICE, "32-true", tokens=40).ok
    assert torch.equal(torch.get_rng_state(), before)


@needs_fused
def test_verdicts_are_cached_per_shape_and_stop_at_the_first_failure(monkeypatch):
    other = LayerShape(24, 16, 3, bias=False)
    calls = []
    real = selfcheck.check_shape
    monkeypatch.setattr(selfcheck, "check_shape", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    assert selfcheck.self_check([SHAPE, other], DEVICE).ok
    assert selfcheck.self_check([other, SHAPE], DEVICE).ok
    assert calls == [SHAPE, other]  # the second model's shapes were known
    _fault(monkeypatch, "raise")
    selfcheck.clear_cache()
    verdict = selfcheck.self_check([SHAPE, other], DEVICE)
    assert not verdict.ok and [c.shape for c in verdict.checks] == [SHAPE]
    assert verdict.failure.shape == SHAPE and verdict.summary()["ok"] is False


# ---------------------------------------------------------------------------------------------------------------
# A whole `noble train`

def _train(tmp_path, kernel: str):
    from noble_cli.train.run import train

    cfg = recipes.resolve("llm-tiny", sets=SETS + [f"noble.kernel={kernel}"])
    result = train(cfg, out=tmp_path, progress=False)
    meta = json.loads((result.run_dir / "meta.json").read_text())
    return meta, pd.read_csv(result.run_dir / "metrics.csv").set_index("step")


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("torch"), "torch")


def _plan_as_on_cuda(monkeypatch):
    """`auto` plans the fused path on CUDA only: here it plans it as on CUDA, and the kernels run where they can
    (the interpreter on a CPU)."""
    import noble_cli.tasks.base as base

    monkeypatch.setattr(base, "plan", lambda branch, requested, device: impl.plan(branch, requested, "cuda"))


@needs_fused
@pytest.mark.parametrize("kind", ["raise", "wrong"])
def test_auto_falls_back_to_torch_when_the_check_fails(tmp_path, monkeypatch, capsys, torch_run, kind):
    _plan_as_on_cuda(monkeypatch)
    _fault(monkeypatch, kind)
    meta, metrics = _train(tmp_path, "auto")
    assert meta["kernel"] == "torch" and meta["kernel_requested"] == "auto"
    assert "failed their self-check at 16->64 r4 (no bias)" in meta["kernel_reason"]
    assert ("injected kernel failure" if kind == "raise" else "y differs") in meta["kernel_reason"]
    assert meta["kernel_check"]["ok"] is False
    warnings = [line for line in capsys.readouterr().err.splitlines() if "self-check" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "16->64 r4" in warnings[0]
    # the torch path from the first step, and the check drew none of the run's random numbers: the same losses
    torch_meta, torch_metrics = torch_run
    pd.testing.assert_series_equal(metrics["train_loss"], torch_metrics["train_loss"], rtol=0, atol=0)
    pd.testing.assert_series_equal(metrics["eval_loss"], torch_metrics["eval_loss"], rtol=0, atol=0)


@needs_fused
def test_auto_keeps_the_fused_path_when_the_check_passes(tmp_path, monkeypatch):
    _plan_as_on_cuda(monkeypatch)
    meta, _ = _train(tmp_path, "auto")
    assert meta["kernel"] == "triton" and "passed their self-check" in meta["kernel_reason"]
    assert [s["shape"] for s in meta["kernel_check"]["shapes"]] == ["16->64 r4 (no bias)", "64->16 r4 (no bias)"]


def test_processes_agree_when_another_one_failed(tmp_path, monkeypatch):
    """DDP/FSDP: every process follows the all-reduced verdict, also one whose own check passed."""
    from noble_cli.layers import NobleLinear
    from noble_cli.layers.implementation import Choice
    from noble_cli.layers.selfcheck import Verdict
    from noble_cli.train import kernel_check
    from noble_cli.train.run_folder import RunFolder

    monkeypatch.setattr(kernel_check, "self_check", lambda *a, **k: Verdict(ok=True, checks=[], seconds=0.0))
    module = types.SimpleNamespace(model=torch.nn.Sequential(NobleLinear(8, 12, rank=2, kernel="triton")),
                                   device=torch.device("cpu"),
                                   implementation=Choice("auto", "triton", "pending", pending=True))
    strategy = types.SimpleNamespace(reduce_boolean_decision=lambda ok, all=True: False)  # another rank failed
    trainer = types.SimpleNamespace(strategy=strategy, precision="bf16-mixed", is_global_zero=False)
    kernel_check.KernelSelfCheck(RunFolder(tmp_path)).on_fit_start(trainer, module)
    assert module.implementation.kernel == "torch" and "another process" in module.implementation.reason
    assert module.model[0].kernel == "torch"


@needs_fused
def test_explicit_triton_fails_with_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from noble_cli.cli import main

    _fault(monkeypatch, "raise")
    args = ["noble", "train", "llm-tiny", "--kernel", "triton", "--out", str(tmp_path)]
    for s in SETS:
        args += ["--set", s]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert "noble.kernel is triton, but the fused kernels failed their self-check at 16->64 r4" in errors[0]
    assert "injected kernel failure" in errors[0] and "--kernel torch" in errors[0]


def test_an_older_noble_kernels_without_today_s_api_fails_at_import_naming_what_it_lacks(monkeypatch):
    """An older noble_kernels (installed elsewhere, before the design switches) is refused where it is imported,
    naming what it lacks, instead of bench silently testing less with it."""
    import types

    from noble_cli.layers import implementation

    old = types.ModuleType("noble_kernels")
    old.cosnet_linear, old.available = object(), lambda: True
    monkeypatch.setattr(implementation, "_LOADED", None)
    monkeypatch.setitem(sys.modules, "noble_kernels", old)
    with pytest.raises(ImportError, match="lacks KernelOptions, options, .*an older copy"):
        implementation.import_noble_kernels()

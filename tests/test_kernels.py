"""Correctness of the fused NOBLE CosNet kernels (noble_kernels.cosnet_linear) against a float64 reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before any kernel is
decorated: Triton reads the variable when `@triton.jit` runs, which noble_kernels defers to the first launch), so
shapes are tiny but deliberately not multiples of the block sizes (16 under the interpreter), and every output a
kernel writes starts as NaN (`poisoned()`), so an element a kernel forgets to write fails the test.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def _import_noble_kernels():
    """`noble_kernels` as installed (`pip install -e .` maps kernels/ to it), else straight from kernels/."""
    try:
        import noble_kernels
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "noble_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")])
        noble_kernels = importlib.util.module_from_spec(spec)
        sys.modules["noble_kernels"] = noble_kernels
        spec.loader.exec_module(noble_kernels)
    return noble_kernels


nk = _import_noble_kernels()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not nk.available(DEVICE), reason=f"fused kernels cannot run on {DEVICE} here")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = ("weight", "bias", "down_weight", "down_bias", "freq1", "phase1", "mix_weight", "mix_bias", "freq2",
          "phase2", "up_weight")


reference = nk.testing.reference_cosnet_linear  # the layer from its formula, in float64


def make_inputs(lead, k, n, r, *, bias=True, seed=0, device=DEVICE):
    """Fresh random inputs, scaled so that every term of the output and every gradient is O(1)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    p = {
        "weight": rnd(n, k, scale=k ** -0.5), "bias": rnd(n, scale=0.5) if bias else None,
        "down_weight": rnd(r, k, scale=k ** -0.5), "down_bias": rnd(r, scale=0.5),
        "freq1": (torch.rand(r, generator=gen, dtype=torch.float64) + 0.5).to(device), "phase1": rnd(r),
        "mix_weight": rnd(r, r, scale=r ** -0.5), "mix_bias": rnd(r, scale=0.5),
        "freq2": (torch.rand(r, generator=gen, dtype=torch.float64) + 0.5).to(device), "phase2": rnd(r),
        "up_weight": rnd(n, r, scale=r ** -0.5),
    }
    return rnd(*lead, k), p, rnd(*lead, n)


def run_case(x64, p64, g64, *, dtype, autocast=False, gemm=None):
    """Kernel output and gradients (inputs cast to `dtype`, or fp32 under autocast) vs the float64 reference
    evaluated on the very values the kernel saw. Returns {name: (got, want)}."""
    in_dtype = torch.float32 if autocast else dtype
    x = x64.to(in_dtype).requires_grad_(True)
    p = {k: None if v is None else v.to(in_dtype).requires_grad_(True) for k, v in p64.items()}
    with nk.poisoned(), torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
        y = nk.cosnet_linear(x, *(p[k] for k in PARAMS), gemm=gemm)
    assert y.shape == g64.shape
    assert y.dtype == (dtype if autocast else in_dtype)
    g = g64.to(y.dtype)
    with nk.poisoned():
        y.backward(g)

    xr = x.detach().double().requires_grad_(True)
    pr = {k: None if v is None else v.detach().double().requires_grad_(True) for k, v in p.items()}
    yr = reference(xr, *(pr[k] for k in PARAMS))
    yr.backward(g.double())
    out = {"y": (y, yr), "x": (x.grad, xr.grad)}
    for k in PARAMS:
        if p[k] is None:
            continue
        assert p[k].grad is not None, f"no gradient for {k}"
        assert p[k].grad.dtype == p[k].dtype, f"{k}: gradient dtype {p[k].grad.dtype} != {p[k].dtype}"
        out[k] = (p[k].grad, pr[k].grad)
    return out


def check(results, rtol):
    """Max error of each tensor relative to that tensor's largest reference value (robust for O(1) data)."""
    bad = []
    for name, (got, want) in results.items():
        got = got.detach().double().cpu()
        want = want.detach().cpu()
        assert torch.isfinite(got).all(), f"{name}: non-finite values (an element was never written?)"
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if err > rtol:
            bad.append(f"{name}: rel err {err:.2e} > {rtol:.0e}")
    assert not bad, "; ".join(bad)


# Shapes: tokens x in -> out at rank r; none a multiple of 16, tails in every dimension, out < in and out > in,
# r below and above one padded rank block, extra leading dimensions.
SHAPES = [((37,), 48, 40, 5), ((3, 7), 40, 72, 17)]


@pytest.mark.parametrize("lead,k,n,r", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_matches_float64_reference(lead, k, n, r, bias):
    x, p, g = make_inputs(lead, k, n, r, bias=bias)
    check(run_case(x, p, g, dtype=torch.float32), rtol=2e-5)


@pytest.mark.parametrize("r, bm, bn", [(5, 32, 32), (17, 32, 32), (5, 16, 32), (5, 32, 16)])
def test_rank_narrower_than_the_gemm_tiles(monkeypatch, r, bm, bn):
    """32-wide tiles with r padded to 16 (r=5): the weight-gradient kernel's r-sized tiles (dW_up columns, dW_down
    rows) are then narrower than its main tiles; r=17 pads to 32, the tiles' own width; and unequal BLOCK_M and
    BLOCK_N, as in the 256x128 and 64x128 autotune configs."""
    if DEVICE != "cpu":
        pytest.skip("interpreter tile sizes")
    for key, value in (("BLOCK_M", bm), ("BLOCK_N", bn), ("BLOCK_K", 32)):
        monkeypatch.setitem(nk._common.INTERPRET_BLOCKS, key, value)
    x, p, g = make_inputs((45,), 40, 72, r, seed=11)
    check(run_case(x, p, g, dtype=torch.float32), rtol=2e-5)


def test_bf16_matches_float64_reference():
    x, p, g = make_inputs((37,), 48, 40, 5, seed=1)
    check(run_case(x, p, g, dtype=torch.bfloat16), rtol=3e-2)


def test_autocast_bf16_fp32_params():
    """Under autocast the inputs are fp32 master weights: output in bf16, every gradient back in fp32."""
    x, p, g = make_inputs((37,), 48, 40, 5, seed=2)
    check(run_case(x, p, g, dtype=torch.bfloat16, autocast=True), rtol=3e-2)


def test_cublas_gemm_backend_matches():
    """gemm="torch": the fused r-wide kernels with library GEMMs for the full-width products."""
    x, p, g = make_inputs((37,), 48, 40, 5, seed=3, bias=False)
    check(run_case(x, p, g, dtype=torch.float32, gemm="torch"), rtol=2e-5)


def test_optional_branch_biases():
    """down_bias / mix_bias may be None too (their gradients are then None)."""
    x, p, g = make_inputs((19,), 24, 20, 3, seed=4)
    p["down_bias"] = None
    p["mix_bias"] = None
    check(run_case(x, p, g, dtype=torch.float32), rtol=2e-5)


def test_no_tokens():
    x, p, _ = make_inputs((0,), 24, 20, 3)
    p = {k: None if v is None else v.float().requires_grad_(True) for k, v in p.items()}
    x = x.float().requires_grad_(True)
    y = nk.cosnet_linear(x, *(p[k] for k in PARAMS))
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 24) and float(p["weight"].grad.abs().sum()) == 0.0


def test_strided_operands():
    """Views are read through their strides: a column-major weight, a transposed x, stride-2 vectors."""
    x64, p64, g64 = make_inputs((19,), 24, 40, 7, seed=7)
    want = run_case(x64, p64, g64, dtype=torch.float32)

    x = x64.float().t().contiguous().t()  # a (19, 24) view with strides (1, 19)
    p = {k: v.float() for k, v in p64.items()}
    p["weight"] = p["weight"].t().contiguous().t()
    for k in ("bias", "freq1", "phase2", "mix_bias"):
        p[k] = torch.stack([p[k], torch.zeros_like(p[k])], -1)[:, 0]  # stride 2
    assert not x.is_contiguous() and p["bias"].stride() == (2,)
    x.requires_grad_(True)
    for v in p.values():
        v.requires_grad_(True)
    with nk.poisoned():
        y = nk.cosnet_linear(x, *(p[k] for k in PARAMS))
        y.backward(g64.float())
    torch.testing.assert_close(y.double(), want["y"][0].double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), want["x"][0].double(), rtol=1e-5, atol=1e-5)
    for k in PARAMS:
        torch.testing.assert_close(p[k].grad.double(), want[k][0].double(), rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("change, message", [
    (lambda x, p: (x[..., :-1], p), "last dimension of x has shape"),
    (lambda x, p: (x, {**p, "up_weight": p["up_weight"][:, :-1]}), "up_weight has shape"),
    (lambda x, p: (x, {**p, "freq2": p["freq2"][:-1]}), "freq2 has shape"),
])
def test_mismatched_shapes_are_refused(change, message):
    """What F.linear would refuse is refused (the kernels would otherwise read out of bounds)."""
    x64, p64, _ = make_inputs((5,), 24, 40, 7)
    x, p = change(x64.float(), {k: v.float() for k, v in p64.items()})
    with pytest.raises(ValueError, match=message):
        nk.cosnet_linear(x, *(p[k] for k in PARAMS))


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake kernels (shapes, dtypes, strides) and autograd registration agree with
    the real ops, including a column-major weight whose gradient is still returned contiguous."""
    x64, p64, g64 = make_inputs((11,), 24, 40, 7, seed=3)
    x, g = x64.float(), g64.float()
    p = {k: v.float() for k, v in p64.items()}
    p["weight"] = p["weight"].t().contiguous().t()
    fwd, bwd = torch.ops.noble_kernels.cosnet_linear_fwd.default, torch.ops.noble_kernels.cosnet_linear_bwd.default
    args = [p[k] for k in PARAMS]
    opts = nk.KernelOptions().as_args()
    torch.library.opcheck(fwd, (x.requires_grad_(True), *[a.detach().requires_grad_(True) for a in args], *opts))
    _, h, c = fwd(x.detach(), *args, *opts)
    torch.library.opcheck(bwd, (g, x.detach(), p["weight"], p["down_weight"], p["freq1"], p["phase1"],
                                p["mix_weight"], p["mix_bias"], p["freq2"], p["phase2"], p["up_weight"], h, c,
                                True, *opts))


def _noble_linear(kernel, in_f=48, out_f=40, rank=5, device=DEVICE):
    from noble_cli.layers.linear import NobleLinear

    torch.manual_seed(0)
    layer = NobleLinear(in_f, out_f, rank=rank, activation="cosnet", kernel=kernel, device=device)
    with torch.no_grad():  # the init makes the branch nearly zero; make it matter for the comparison
        layer.up.weight.normal_(0.0, rank ** -0.5)
    return layer


def _layer_args(layer):
    a = layer.act
    return (layer.weight, layer.bias, layer.down.weight, layer.down.bias, a.freq1, a.phase1, a.mix.weight,
            a.mix.bias, a.freq2, a.phase2, layer.up.weight)


def test_matches_noble_linear_torch_path():
    """cosnet_linear with a NobleLinear's parameters == that layer's torch forward, outputs and gradients."""
    layer = _noble_linear("torch")
    x = torch.randn(37, 48, device=DEVICE)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = layer(xa)
    ya.square().sum().backward()
    want = [xa.grad] + [t.grad.clone() for t in _layer_args(layer)]
    layer.zero_grad()
    with nk.poisoned():
        yb = nk.cosnet_linear(xb, *_layer_args(layer))
        yb.square().sum().backward()
    got = [xb.grad] + [t.grad for t in _layer_args(layer)]
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_import_without_triton():
    """`import noble_kernels` must work where triton is missing; available() then says False."""
    code = (
        "import sys, importlib.util\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        f"root = {str(ROOT / 'kernels')!r}\n"
        "spec = importlib.util.spec_from_file_location('noble_kernels', root + '/__init__.py',"
        " submodule_search_locations=[root])\n"
        "nk = importlib.util.module_from_spec(spec); sys.modules['noble_kernels'] = nk; spec.loader.exec_module(nk)\n"
        "print(nk.available('cpu'), nk.available('cuda'))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]


def _count_fused_calls(monkeypatch) -> list:
    """Counts calls of the fused op: proves that a NobleLinear took the Triton path, not its torch fallback."""
    calls, real = [], nk.cosnet_linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nk, "cosnet_linear", counting)
    return calls


def test_training_run_matches_torch_path(tmp_path, monkeypatch):
    """`noble train` with kernel=triton follows the torch path's loss curve: fp32 on the CPU (interpreter) to
    summation-order noise, bf16 autocast on a GPU to bf16 noise."""
    import pandas as pd

    from noble_cli import recipes
    from noble_cli.train.run import train

    calls = _count_fused_calls(monkeypatch)
    sets = ["model.d_model=16", "model.n_head=2", "model.n_layer=1", "model.block_size=16", "data.seq_len=16",
            "trainer.batch_size=2", "trainer.eval_batches=1", "trainer.eval_every=3", "trainer.max_steps=6",
            "schedule.warmup_steps=2", "optim.lr=1e-2", "noble.branch=cosnet", "noble.rank=4", "noble.targets=mlp",
            "noble.up_init_scale=1.0"]  # a branch of the main path's size, so that a wrong branch shows in the loss
    # (MLP only: fc and fc2 cover both in < out and in > out, at a third of the interpreter's time for all six)
    curves = {}
    for kernel in ("torch", "triton"):
        cfg = recipes.resolve("llm-tiny", sets=sets + [f"noble.kernel={kernel}"])
        result = train(cfg, out=tmp_path, progress=False)
        assert result.meta["kernel"] == kernel
        curves[kernel] = pd.read_csv(result.run_dir / "metrics.csv").set_index("step")
        assert (len(calls) > 0) == (kernel == "triton")
    torch_, triton_ = curves["torch"], curves["triton"]
    tol = 1e-4 if DEVICE == "cpu" else 3e-2
    pd.testing.assert_series_equal(triton_["train_loss"], torch_["train_loss"], rtol=tol, atol=0)
    evals = [c["eval_loss"].dropna() for c in (triton_, torch_)]
    assert list(evals[0].index) == [3, 6]
    pd.testing.assert_series_equal(*evals, rtol=tol, atol=0)
    assert torch_["train_loss"].iloc[-1] < torch_["train_loss"].iloc[0], "the run must learn for this to mean much"


# ---------------------------------------------------------------------------------------------------------------
# GPU only: compiled kernels at realistic widths, the module dispatch, torch.compile.

@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_realistic_shapes(dtype):
    for lead, k, n, r in [((4, 250), 256, 768, 64), ((1000,), 1024, 1024, 32), ((333,), 512, 200, 24)]:
        x, p, g = make_inputs(lead, k, n, r, seed=5, device="cuda")
        check(run_case(x, p, g, dtype=dtype), rtol=2e-3 if dtype == torch.float32 else 3e-2)
    x, p, g = make_inputs((2, 300), 256, 512, 64, seed=6, device="cuda")
    check(run_case(x, p, g, dtype=torch.bfloat16, autocast=True), rtol=3e-2)


@gpu
@needs_cuda
def test_gpu_noble_linear_dispatch_matches_torch(monkeypatch):
    """NobleLinear(kernel="triton") dispatches to the fused path on CUDA and matches kernel="torch"."""
    calls = _count_fused_calls(monkeypatch)
    ref, fused = _noble_linear("torch", 256, 512, 32, "cuda"), _noble_linear("triton", 256, 512, 32, "cuda")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 100, 256, device="cuda")
    outs = []
    for layer in (ref, fused):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(xi)
        y.float().square().mean().backward()
        outs.append([y.float(), xi.grad] + [t.grad for t in _layer_args(layer)])
    assert len(calls) == 1, "only the triton layer takes the fused path"
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * float(b.abs().max()))


@gpu
@needs_cuda
def test_gpu_torch_compile():
    layer = _noble_linear("triton", 256, 512, 32, "cuda")
    x = torch.randn(2, 64, 256, device="cuda", requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    compiled.sum().backward()
    assert all(t.grad is not None and math.isfinite(float(t.grad.abs().sum())) for t in _layer_args(layer))

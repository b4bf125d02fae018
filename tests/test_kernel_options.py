"""The fused kernels' design switches (noble_kernels.KernelOptions), their launch configs (autotune_space,
forced_config) and noble_kernels.testing, against float64 on fresh random inputs.

Without a GPU the kernels run in Triton's interpreter (set up by test_kernels, imported below), with tiny shapes
that are not multiples of the 16-wide interpreter tiles. Each case also asserts which kernels ran, so that a switch
that silently fell back to the default variant fails.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from test_kernels import DEVICE, nk, pytestmark  # noqa: F401  (pytestmark: skip where the kernels cannot run)

# (options, dtype, bias, (tokens, in, out, rank), kernels that must run, kernels that must not)
SWITCH_CASES = [
    # split-K: 100 tokens in 3 ranges of 48, 48 and 4 (interpreter: ranges of 2 K tiles); 70 tokens in 2
    ({"dw": "splitk"}, torch.float32, True, (100, 24, 40, 7), {"weight_grad_splitk"}, {"weight_grad"}),
    ({"dw": "splitk"}, torch.bfloat16, False, (70, 48, 40, 5), {"weight_grad_splitk"}, {"weight_grad"}),
    ({"dw": "cublas"}, torch.float32, False, (37, 48, 40, 5), set(), {"weight_grad", "weight_grad_splitk"}),
    ({"dw": "cublas"}, torch.bfloat16, True, (37, 40, 72, 17), set(), {"weight_grad", "weight_grad_splitk"}),
    # one loop: ragged K1 and K2 (masked), K1 and K2 multiples of the K tile (unmasked), bf16
    ({"dual_gemm": "one_loop"}, torch.float32, True, (37, 40, 72, 17), {"dual_gemm_one_loop"}, {"dual_gemm"}),
    ({"dual_gemm": "one_loop"}, torch.float32, False, (37, 32, 48, 16), {"dual_gemm_one_loop"}, {"dual_gemm"}),
    ({"dual_gemm": "one_loop"}, torch.bfloat16, True, (45, 48, 40, 5), {"dual_gemm_one_loop"}, {"dual_gemm"}),
    # finalize: CosNet rows only; with split-K partials (fp32 and bf16 gradients, bias and none); with cuBLAS GEMMs
    ({"partials": "finalize"}, torch.float32, True, (37, 40, 72, 17), {"finalize", "weight_grad"}, set()),
    ({"partials": "finalize", "dw": "splitk"}, torch.float32, True, (100, 40, 24, 17),
     {"finalize", "weight_grad_splitk"}, set()),
    ({"partials": "finalize", "dw": "splitk"}, torch.bfloat16, False, (70, 48, 40, 5),
     {"finalize", "weight_grad_splitk"}, set()),
    ({"partials": "finalize", "gemm": "torch"}, torch.float32, True, (37, 48, 40, 5), {"finalize"},
     {"dual_gemm", "weight_grad"}),
]


def _ran(result) -> set:
    return {k["kernel"] for k in result["kernels"]}


@pytest.mark.parametrize("opts, dtype, bias, shape, must, must_not", SWITCH_CASES,
                         ids=[f"{'-'.join(c[0].values())}-{str(c[1])[6:]}-{'bias' if c[2] else 'nobias'}"
                              for c in SWITCH_CASES])
def test_switch_matches_float64(opts, dtype, bias, shape, must, must_not):
    result = nk.testing.check(*shape, dtype, DEVICE, bias, seed=sum(shape), options=opts)
    assert result["ok"], (result["worst"], result["max_error"], result["tolerance"], result["finite"])
    assert must <= _ran(result) and not must_not & _ran(result), _ran(result)
    assert result["options"] == {**nk.KernelOptions().__dict__, **opts}


# Every config of every kernel, forced: two option sets cover all kernels (the default variants; the others), with
# config i of each kernel (i modulo its count) in case i, alternating fp32 and bf16 tiles.
N_CONFIGS = max(len(v) for v in nk.autotune_space().values())


@pytest.mark.parametrize("index", range(N_CONFIGS))
@pytest.mark.parametrize("variant", ["defaults", "alternatives"])
def test_every_autotune_config_is_correct(variant, index):
    if DEVICE != "cpu":
        pytest.skip("the GPU suite runs every config at training shapes")
    dtype = torch.float32 if index % 2 == 0 else torch.bfloat16
    opts = {"partials": "finalize"}
    if variant == "alternatives":
        opts.update(dw="splitk", dual_gemm="one_loop")
    # enough tokens for two split-K ranges of two K tiles (fp32 K tiles: 32 tokens; bf16: 64)
    tokens = 130 if dtype == torch.float32 else 260
    space = nk.autotune_space(dtype.itemsize)
    with contextlib.ExitStack() as stack:
        for name, cfgs in space.items():
            stack.enter_context(nk.forced_config(name, index % len(cfgs)))
        result = nk.testing.check(tokens, 40, 72, 17, dtype, DEVICE, bias=True, seed=index, options=opts)
    assert result["ok"], (result["worst"], result["max_error"], result["tolerance"])
    ran = [(k["kernel"], k["config"]) for k in result["kernels"]]
    expected = {"down_cosnet_fwd", "cosnet_bwd", "finalize"} | (
        {"dual_gemm", "weight_grad"} if variant == "defaults" else {"dual_gemm_one_loop", "weight_grad_splitk"})
    assert {name for name, _ in ran} == expected
    for name, config in ran:
        assert config == space[name][index % len(space[name])], name


def test_autotune_space_and_forced_config():
    space = nk.autotune_space()
    assert set(space) == {"down_cosnet_fwd", "dual_gemm", "dual_gemm_one_loop", "cosnet_bwd", "weight_grad",
                          "weight_grad_splitk", "finalize"}
    fp32 = nk.autotune_space(4)
    for name, configs in space.items():
        assert configs and all({"num_warps", "num_stages"} <= set(c) for c in configs), name
        assert len(fp32[name]) == len(configs)
        if "BLOCK_K" in configs[0] and name != "down_cosnet_fwd":  # GEMM tiles: fp32 halves the K depth
            assert [c["BLOCK_K"] for c in fp32[name]] == [c["BLOCK_K"] // 2 for c in configs], name
    with nk.forced_config("dual_gemm", 2) as cfg:
        assert cfg == space["dual_gemm"][2]
        assert nk.tuning.plan("dual_gemm", 2, torch.device("cuda")) == cfg
    assert nk.tuning.plan("dual_gemm", 2, torch.device("cuda")) in (None, space["dual_gemm"][0])  # restored
    with pytest.raises(ValueError, match="configs 0..4, not 5"):
        with nk.forced_config("dual_gemm", 5):
            pass
    with pytest.raises(ValueError, match="unknown kernel 'gemm'"):
        with nk.forced_config("gemm", 0):
            pass


def test_kernel_options_values_and_context(monkeypatch):
    monkeypatch.delenv("NOBLE_KERNELS_GEMM", raising=False)
    assert nk.KernelOptions() == nk.KernelOptions("triton", "fused", "two_loops", "host") == nk.current_options()
    assert nk.KernelOptions.choices() == {"gemm": ("triton", "torch"), "dw": ("fused", "splitk", "cublas"),
                                          "dual_gemm": ("two_loops", "one_loop"), "partials": ("host", "finalize")}
    with pytest.raises(ValueError, match=r"^KernelOptions.dw='atomic'; valid: fused, splitk, cublas$"):
        nk.KernelOptions(dw="atomic")
    with pytest.raises(ValueError, match="unknown option.*split_k"):
        with nk.options(split_k=4):
            pass
    with nk.options(dw="splitk") as outer:
        assert nk.current_options() == outer == nk.KernelOptions(dw="splitk")
        with pytest.raises(RuntimeError), nk.options(partials="finalize", dw="cublas"):
            assert nk.current_options() == nk.KernelOptions(dw="cublas", partials="finalize")
            raise RuntimeError
        assert nk.current_options() == outer
    assert nk.current_options() == nk.KernelOptions()
    monkeypatch.setenv("NOBLE_KERNELS_GEMM", "torch")
    assert nk.current_options().gemm == "torch"
    with nk.options(dw="splitk"):  # inherits the environment's gemm
        assert nk.current_options() == nk.KernelOptions(gemm="torch", dw="splitk")
    monkeypatch.setenv("NOBLE_KERNELS_GEMM", "cutlass")
    with pytest.raises(ValueError, match="NOBLE_KERNELS_GEMM='cutlass'; valid: triton, torch"):
        nk.current_options()


def test_gemm_keyword_overrides_the_options():
    inputs = nk.testing.make_inputs(19, 24, 20, 3, torch.float32, DEVICE, bias=False, seed=5)
    inputs.pop("grad_out")
    with nk.options(gemm="triton"), nk.tuning.record_launches() as ran:
        nk.cosnet_linear(**inputs, gemm="torch")
    assert [name for name, _ in ran] == ["down_cosnet_fwd"]


def test_compiled_caller_follows_the_options():
    """torch.compile does not bake in the options of its first call: they reach the ops as graph constants, and
    the backward follows the options its forward ran under, even when called outside the block."""
    inputs = nk.testing.make_inputs(20, 24, 20, 3, torch.float32, DEVICE, bias=False, seed=6)
    g = inputs.pop("grad_out")
    leaves = {k: None if v is None else v.requires_grad_(True) for k, v in inputs.items()}
    compiled = torch.compile(lambda kw: nk.cosnet_linear(**kw), backend="aot_eager", fullgraph=True)
    seen = []
    for opts in ({}, {"dw": "cublas", "dual_gemm": "one_loop"}, {"partials": "finalize"}, {}):
        with nk.tuning.record_launches() as ran:
            with nk.options(**opts):
                y = compiled(leaves)
            y.backward(g)
        seen.append([name for name, _ in ran])
    assert seen[0] == seen[3] == ["down_cosnet_fwd", "dual_gemm", "cosnet_bwd", "dual_gemm", "weight_grad"]
    assert seen[1] == ["down_cosnet_fwd", "dual_gemm_one_loop", "cosnet_bwd", "dual_gemm_one_loop"]
    assert seen[2] == seen[0] + ["finalize"]


def test_split_count_at_llm_250m_shapes():
    from noble_kernels import fused_linear

    assert fused_linear.split_count(16384, 1024, 1024) == 4  # q, k, v, o: 80 tiles -> 320 programs
    assert fused_linear.split_count(16384, 4096, 1024) == fused_linear.split_count(16384, 1024, 4096) == 1
    assert fused_linear.split_count(1024, 1024, 1024) == 1  # fewer tokens than two minimum ranges
    for t in (37, 64, 100, 1000, 16384):  # ranges: whole K tiles, none empty, covering every token once
        splits, chunk = fused_linear._splits(t, 64, 64, 8, torch.device("cpu"), 16)
        assert chunk % 16 == 0 and (splits - 1) * chunk < t <= splits * chunk


def test_check_reports_a_wrong_gradient(monkeypatch):
    """noble_kernels.testing.check fails a kernel that is 1% off in one gradient, and names it."""
    from noble_kernels import partials

    real = partials.finish

    def off_by_one_percent(*args):
        vectors, dmix, wgrads = real(*args)
        return vectors, dmix * 1.01, wgrads

    monkeypatch.setattr(partials, "finish", off_by_one_percent)
    result = nk.testing.check(37, 24, 20, 3, torch.float32, DEVICE, bias=True, seed=8)
    assert not result["ok"] and result["finite"] and result["worst"] == "mix_weight"
    assert 5e-3 < result["errors"]["mix_weight"] < 2e-2 and result["errors"]["weight"] < result["tolerance"]


def test_make_inputs_and_tolerances():
    a = nk.testing.make_inputs(5, 8, 6, 3, torch.bfloat16, "cpu", bias=False, seed=1)
    b = nk.testing.make_inputs(5, 8, 6, 3, torch.bfloat16, "cpu", bias=False, seed=1)
    assert list(a) == [*nk.testing.ARGS, "grad_out"] and a["bias"] is None
    assert all(torch.equal(a[k], b[k]) for k in a if a[k] is not None)
    assert a["x"].dtype == torch.float32 and a["up_weight"].shape == (6, 3) and a["grad_out"].shape == (5, 6)
    assert ((a["freq1"] >= 0.8) & (a["freq1"] <= 1.2)).all()
    assert nk.testing.tolerance_for(torch.bfloat16, "cpu", 16384) == 4 * 2.0 ** -7
    assert nk.testing.tolerance_for(torch.float32, "cpu", 16) == 2e-5
    assert nk.testing.tolerance_for(torch.float32, "cpu", 16384) == pytest.approx(8 * 2.0 ** -23 * 128)

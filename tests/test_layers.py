"""The NOBLE layer library: formula, init, lr groups, parameter counts, apply_noble, validation."""

import math

import pytest
import torch
import torchvision
from torch import nn

from noble_cli.errors import NobleError
from noble_cli.layers import (
    ACTIVATIONS,
    LRMultipliers,
    NobleLinear,
    apply_noble,
    count_parameters,
    noble_layers,
    param_groups,
)
from noble_cli.models.gpt import GPT, GPTConfig


def randomize(module: nn.Module, seed: int) -> None:
    """Fresh random values in every parameter (init values such as a zero bias would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def cosnet_reference(x, layer: NobleLinear):
    """y = x W^T + b + W_up cos(f2 * (M cos(f1 * (W_down x + b_down) + p1) + c) + p2), in float64."""
    P = {n: p.detach().double() for n, p in layer.named_parameters()}
    x = x.double()
    h = x @ P["down.weight"].T + P["down.bias"]
    c1 = torch.cos(P["act.freq1"] * h + P["act.phase1"])
    c2 = torch.cos(P["act.freq2"] * (c1 @ P["act.mix.weight"].T + P["act.mix.bias"]) + P["act.phase2"])
    return x @ P["weight"].T + P["bias"] + c2 @ P["up.weight"].T


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(7, 24, 40, 5), (3, 64, 16, 8)])
def test_cosnet_matches_float64_reference(seed, shape):
    tokens, d_in, d_out, r = shape
    layer = NobleLinear(d_in, d_out, rank=r, activation="cosnet").double()
    randomize(layer, seed)
    x = torch.randn(2, tokens, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + seed))
    torch.testing.assert_close(layer(x), cosnet_reference(x, layer), rtol=1e-12, atol=1e-12)
    # float32 layer against the float64 reference: float32 tolerances
    layer32 = layer.float()
    torch.testing.assert_close(layer32(x.float()).double(), cosnet_reference(x, layer32), rtol=1e-4, atol=1e-4)


def test_branch_gradients_match_finite_differences():
    layer = NobleLinear(6, 5, rank=3, activation="cosnet").double()
    randomize(layer, 3)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: layer(inp), (x,))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_runs_and_learns(name):
    layer = NobleLinear(16, 12, rank=4, activation=name)
    x = torch.randn(5, 16)
    y = layer(x)
    assert y.shape == (5, 12)
    assert layer.act(layer.down(x)).shape[-1] == 4, "the bottleneck must hand `rank` channels to up"
    y.square().sum().backward()
    assert layer.up.weight.grad is not None and layer.up.weight.grad.abs().sum() > 0
    assert layer.down.weight.grad.abs().sum() > 0


def test_identity_branch_collapses_into_the_main_weight():
    layer = NobleLinear(8, 6, rank=3, activation="identity").double()
    randomize(layer, 0)
    assert layer.down.bias is None
    x = torch.randn(4, 8, dtype=torch.float64)
    merged = layer.weight + layer.up.weight @ layer.down.weight
    torch.testing.assert_close(layer(x), x @ merged.T + layer.bias)


def test_init_statistics():
    torch.manual_seed(0)
    d_in, d_out, r = 1024, 2048, 64
    layer = NobleLinear(d_in, d_out, rank=r, activation="cosnet")
    layer.reset_main(0.5)
    a = layer.act

    def close(t, std):
        assert t.std().item() == pytest.approx(std, rel=0.05)
        assert abs(t.mean().item()) < 3 * std / math.sqrt(t.numel()) + 1e-6

    close(layer.weight, 0.5 / math.sqrt(d_in))
    close(layer.down.weight, 1 / math.sqrt(d_in))
    close(layer.up.weight, 0.01 / math.sqrt(r))
    assert torch.count_nonzero(layer.up.weight) == layer.up.weight.numel(), "near zero, not exactly zero"
    close(a.mix.weight, 0.5 / math.sqrt(r))
    assert torch.all(layer.bias == 0) and torch.all(layer.down.bias == 0)
    for f in (a.freq1, a.freq2):
        assert f.min() >= 0.8 and f.max() <= 1.2 and f.mean().item() == pytest.approx(1.0, abs=0.05)
    phases = torch.cat([a.phase1, a.phase2])
    assert phases.std().item() == pytest.approx(0.1, rel=0.25)
    assert phases.abs().max() < 2 * math.pi
    bound = 1 / math.sqrt(r)  # PyTorch's default Linear bias init for the mix bias
    assert a.mix.bias.abs().max() <= bound


def test_lr_multipliers_and_groups():
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential(nn.Linear(256, 1024), nn.LayerNorm(1024)))
    apply_noble(model, rank=16, activation="cosnet", targets="mlp")
    layer = model.mlp[0]
    groups = param_groups(model, base_lr=1e-3, weight_decay=0.1)
    mult = {id(p): g["lr_mult"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    # by hand: min(256, 1024) / 16 = 16; 16^0.4 = 3.0314, 16^0.5 = 4
    assert mult[id(layer.up.weight)] == pytest.approx(3.0314, rel=1e-4)
    assert mult[id(layer.act.mix.weight)] == pytest.approx(4.0)
    assert mult[id(layer.act.mix.bias)] == 1.0
    assert mult[id(layer.act.freq1)] == mult[id(layer.act.freq2)] == 2.0
    assert mult[id(layer.act.phase1)] == mult[id(layer.act.phase2)] == 4.0
    assert mult[id(layer.weight)] == mult[id(layer.down.weight)] == 1.0
    assert decay[id(layer.weight)] == 0.1 and decay[id(layer.bias)] == 0.0 and decay[id(layer.act.freq1)] == 0.0
    for g in groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_mult"])
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted({id(p) for p in model.parameters()})
    # tensors a model lists as no-decay (position embeddings, class tokens) keep their lr but lose the decay
    kept = param_groups(model, 1e-3, 0.1, no_decay=[layer.weight])
    assert [g["weight_decay"] for g in kept for p in g["params"] if p is layer.weight] == [0.0]
    # the reference code's effective mix multiplier of 1 is one option away
    ref = param_groups(model, 1e-3, 0.1, LRMultipliers(mix_power=0.0))
    assert {g["lr_mult"] for g in ref for p in g["params"] if p is layer.act.mix.weight} == {1.0}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_declares_real_parameters_for_its_lr_roles(name):
    """An activation's `lr_roles` name its own parameters (a renamed parameter would otherwise silently fall back to
    the base lr), and the roles give what the paper's table says, whatever the activation."""
    model = nn.Sequential()
    model.add_module("mlp", nn.Sequential(nn.Linear(64, 128)))
    apply_noble(model, rank=8, activation=name, targets="mlp")
    layer = model.mlp[0]
    roles = getattr(layer.act, "lr_roles", {})
    assert set(roles) <= {n for n, _ in layer.act.named_parameters()}
    mult = {id(p): g["lr_mult"] for g in param_groups(model, 1e-3, 0.1) for p in g["params"]}
    expected = {"mix": (64 / 8) ** 0.5, "freq": 2.0, "phase": 4.0}
    for pname, p in layer.act.named_parameters():
        assert mult[id(p)] == pytest.approx(expected.get(roles.get(pname), 1.0)), pname
    if name in ("cos", "cosnet", "cos_net_double"):
        assert {"freq", "phase"} <= set(roles.values())
    if name.endswith("_net") or name.startswith("cos_net") or name == "cosnet":
        assert "mix" in roles.values()
    if name == "cos_net_double":  # both r x r mixes, as the name matching before lr_roles gave them
        assert roles["mix.weight"] == roles["mix2.weight"] == "mix" and len(roles) == 8


def test_a_second_activation_under_a_taken_name_is_refused():
    from noble_cli.layers.activations import register

    with pytest.raises(ValueError, match="'cosnet' is already registered"):
        register("cosnet", ACTIVATIONS["gelu"])
    assert ACTIVATIONS["cosnet"] is not ACTIVATIONS["gelu"]


def test_parameter_counts_match_the_formula():
    cfg = GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=2, d_model=32, mlp_ratio=4.0)
    model = GPT(cfg)
    base = count_parameters(model)
    d, h, L = 32, 128, 2
    # embeddings (padded vocab 128, tied head counted once) + positions + per block (2 LN + 4 d*d + 2 d*h) + final LN
    assert base.total == 128 * d + 16 * d + L * (2 * d + 4 * d * d + 2 * d * h) + d
    assert base.branch == 0
    r = 4
    apply_noble(model, rank=r, activation="cosnet", targets="all")
    counted = count_parameters(model)
    per = lambda i, o: r * (i + o) + r * r + 6 * r  # noqa: E731  (NOBLE.md's formula)
    expected_branch = L * (4 * per(d, d) + per(d, h) + per(h, d))
    assert counted.branch == expected_branch
    assert counted.total == base.total + expected_branch
    assert counted.overhead == pytest.approx(expected_branch / base.total)


def test_apply_noble_on_a_torchvision_model_keeps_its_function():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    x = torch.randn(3, 3, 32, 32)
    before = model(x)
    replaced = apply_noble(model, rank=4, activation="cosnet", targets="mlp")
    assert replaced == [f"encoder.layers.encoder_layer_{i}.mlp.{j}" for i in range(2) for j in (0, 3)]
    for _, layer in noble_layers(model):
        nn.init.zeros_(layer.up.weight)  # with up = 0 the branch adds nothing: the kept weights must give the same output
    torch.testing.assert_close(model(x), before)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-inits the head, which would stop every gradient
    model(x).sum().backward()
    assert all(layer.up.weight.grad.abs().sum() > 0 for _, layer in noble_layers(model))
    # nn.MultiheadAttention never calls its out_proj module: a branch there would do nothing, so it is refused
    with pytest.raises(NobleError, match="matched no linear layer"):
        apply_noble(model, rank=4, targets="attn")


def test_named_target_sets_on_the_gpt():
    def names(targets):
        model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=4, n_head=2, d_model=16))
        return apply_noble(model, rank=2, targets=targets)

    assert names("attn") == [f"blocks.{i}.attn.{p}" for i in range(4) for p in "qkvo"]
    assert names("mlp") == [f"blocks.{i}.mlp.{p}" for i in range(4) for p in ("fc", "fc2")]
    assert len(names("all")) == 24
    assert {n.split(".")[1] for n in names("alternate")} == {"0", "2"}
    assert names("blocks.1.attn.q, blocks.3.mlp.*") == ["blocks.1.attn.q", "blocks.3.mlp.fc", "blocks.3.mlp.fc2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "must be >= 1 and < min"),
        ({"rank": 16}, "must be >= 1 and < min"),
        ({"activation": "relu6"}, "unknown activation 'relu6'; valid: .*cosnet"),
    ],
)
def test_bad_layer_arguments_are_clear(kwargs, message):
    with pytest.raises(NobleError, match=message):
        NobleLinear(16, 32, **{"rank": 4, **kwargs})


def test_unknown_target_is_clear():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, d_model=16))
    with pytest.raises(NobleError, match="unknown target 'attention_only'; valid: all, attn, mlp, alternate"):
        apply_noble(model, rank=2, targets="attention_only")


def _by_names_as_before(model: nn.Module, targets: str) -> list[str]:
    """The name rule apply_noble used before it read the model's structure (attn/mlp in a parent's name, the first
    number in the path as the block index): the built-in models must get exactly these layers still."""
    import re

    attn = re.compile(r"(attn|attention)", re.I)
    mlp = re.compile(r"(mlp|ffn|feed_?forward|intermediate)", re.I)

    def picked(name):
        parents = name.split(".")[:-1]
        a, m = any(attn.search(p) for p in parents), any(mlp.search(p) for p in parents)
        index = re.search(r"\.(\d+)(\.|$)", "." + name)
        return {"all": a or m, "attn": a, "mlp": m,
                "alternate": (a or m) and int(index.group(1) if index else 0) % 2 == 0}[targets]

    return [n for n, m in model.named_modules() if type(m) is nn.Linear and picked(n)]


@pytest.mark.parametrize("targets", ["all", "attn", "mlp", "alternate"])
def test_built_in_models_get_the_layers_they_always_got(targets):
    from noble_cli.models.bert import BERT, BertConfig
    from noble_cli.models.vit import ViT, ViTConfig
    from noble_cli.models.vqgan import VQGAN, VQGANConfig

    builds = [
        lambda: GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=3, n_head=2, d_model=16)),
        lambda: BERT(BertConfig(vocab_size=50, max_position=8, n_layer=3, n_head=2, d_model=16)),
        lambda: ViT(ViTConfig(image_size=8, patch_size=4, num_classes=3, d_model=16, n_layer=3, n_head=2)),
        lambda: VQGAN(VQGANConfig(image_size=8, patch_size=4, d_model=16, n_layer=3, n_layer_decoder=2, n_head=2,
                                  codebook_size=8, codebook_dim=4, recent_size=8)),
    ]
    for build in builds:
        before = _by_names_as_before(build(), targets)
        assert before and apply_noble(build(), rank=2, targets=targets) == before

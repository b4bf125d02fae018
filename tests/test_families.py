"""apply_noble on the model families users have: transformers, timm and torchvision, built from configs (no hub).

For each family: exactly which layers get a branch (every attention and MLP projection of every block; never
embeddings or heads), the model's function kept at init (exactly with W_up = 0, closely with the near-zero W_up),
and a forward and backward pass that reaches every branch.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # transformers loads triton: the CPU kernel tests need this set before it does
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from noble_cli.errors import NobleError  # noqa: E402
from noble_cli.layers import apply_noble, noble_layers  # noqa: E402
from noble_cli.layers.targets import find_blocks, linear_sites  # noqa: E402
from noble_cli.models.external import import_transformers  # noqa: E402

pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
T = import_transformers()  # not the plain import: see its docstring (this checkout's kernels/ folder)
T.logging.set_verbosity_error()

RANK = 4
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=96,
            max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def expected(blocks: list[str], parts: list[str]) -> list[str]:
    return [f"{b}.{p}" for b in blocks for p in parts]


LLAMA_PARTS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
BERT_PARTS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]
TIMM_PARTS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def _hf(config_cls, model_cls, **kw):
    return lambda: model_cls(config_cls(**{**TEXT, **kw}))


def _gpt2():
    return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64,
                                          bos_token_id=0, eos_token_id=1))


def _timm_swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=4,
                             window_size=4, depths=(2, 2), num_heads=(2, 4), embed_dim=16, num_classes=5)


def _tv_swin():
    return torchvision.models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4], num_classes=5)


TOKENS, IMAGE = "tokens", "image"
L2 = ["0", "1"]

# name -> (build, input kind, the layers `all` must give a branch, in model order)
FAMILIES = {
    "llama": (_hf(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2), TOKENS,
              expected([f"model.layers.{i}" for i in L2], LLAMA_PARTS)),
    "qwen2": (_hf(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2), TOKENS,
              expected([f"model.layers.{i}" for i in L2], LLAMA_PARTS)),
    "mistral": (_hf(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2), TOKENS,
                expected([f"model.layers.{i}" for i in L2], LLAMA_PARTS)),
    "gpt2": (_gpt2, TOKENS,  # Conv1D projections, fused qkv
             expected([f"transformer.h.{i}" for i in L2], ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])),
    "gpt_neox": (_hf(T.GPTNeoXConfig, T.GPTNeoXForCausalLM), TOKENS,
                 expected([f"gpt_neox.layers.{i}" for i in L2], ["attention.query_key_value", "attention.dense",
                                                                  "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"])),
    "falcon": (_hf(T.FalconConfig, T.FalconForCausalLM), TOKENS,  # FalconLinear subclasses nn.Linear
               expected([f"transformer.h.{i}" for i in L2], ["self_attention.query_key_value", "self_attention.dense",
                                                              "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"])),
    "bert": (_hf(T.BertConfig, T.BertForMaskedLM), TOKENS,  # the MLP's second layer is `output.dense`
             expected([f"bert.encoder.layer.{i}" for i in L2], BERT_PARTS)),
    "roberta": (_hf(T.RobertaConfig, T.RobertaForMaskedLM, pad_token_id=1), TOKENS,
                expected([f"roberta.encoder.layer.{i}" for i in L2], BERT_PARTS)),
    "hf_vit": (_hf(T.ViTConfig, T.ViTForImageClassification, image_size=32, patch_size=8, num_labels=5), IMAGE,
               expected([f"vit.layers.{i}" for i in L2], ["attention.q_proj", "attention.k_proj", "attention.v_proj",
                                                          "attention.o_proj", "mlp.fc1", "mlp.fc2"])),
    "timm_vit": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                           depth=2, embed_dim=32, num_heads=2, num_classes=5), IMAGE,
                 expected([f"blocks.{i}" for i in L2], TIMM_PARTS)),
    "timm_deit": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32,
                                            patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5), IMAGE,
                  expected([f"blocks.{i}" for i in L2], TIMM_PARTS)),
    "timm_swin": (_timm_swin, IMAGE,  # blocks inside stages; the stage's patch-merging `reduction` is not a block's
                  expected([f"layers.{s}.blocks.{i}" for s in L2 for i in L2], TIMM_PARTS)),
    # torchvision's attention cannot carry a branch: nn.MultiheadAttention keeps Q/K/V in one parameter and reads
    # out_proj.weight itself; Swin's ShiftedWindowAttention passes qkv.weight and proj.weight to a function
    "tv_vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                           hidden_dim=32, mlp_dim=64, num_classes=5), IMAGE,
               expected([f"encoder.layers.encoder_layer_{i}" for i in L2], ["mlp.0", "mlp.3"])),
    "tv_swin": (_tv_swin, IMAGE, expected([f"features.{s}.{i}" for s in (1, 3) for i in L2], ["mlp.0", "mlp.3"])),
}


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if kind == TOKENS:
        return torch.randint(2, 96, (2, 12), generator=g)
    return torch.randn(2, 3, 32, 32, generator=g)


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = model(x)
    return (y.logits if hasattr(y, "logits") else y).float()


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[name][0]().eval()
    for n, m in model.named_modules():  # torchvision and timm zero-init their heads: no gradient would flow
        if isinstance(m, nn.Linear) and n.startswith("head") and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    return model


def _branch_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """RMS of each branch's output on the input the model feeds that layer in one forward pass."""
    seen = {}

    def hook(name):
        return lambda layer, args, out: seen.__setitem__(name, layer.branch(args[0]).pow(2).mean().sqrt().item())

    handles = [layer.register_forward_hook(hook(n)) for n, layer in noble_layers(model)]
    _out(model, x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_gets_branches_on_every_block_projection_and_keeps_its_function(name):
    _, kind, names = FAMILIES[name]
    model = _build(name)
    x = _input(kind)
    with torch.no_grad():
        before = _out(model, x)
    mains = {s.name: s.module.weight.detach().clone() if s.kind == "linear" else s.module.weight.detach().t().clone()
             for s in linear_sites(model)}  # in the (out, in) layout: GPT-2's Conv1D stores (in, out)
    sites = {s.name: s.module for s in linear_sites(model)}
    kinds = {s.name: s.kind for s in linear_sites(model)}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert apply_noble(model, rank=RANK, targets="all") == names
    # torchvision's attention layers are targeted but cannot carry a branch: said, not silent
    assert bool([w for w in caught if "keep no branch" in str(w.message)]) == name.startswith("tv_")
    assert [n for n, _ in noble_layers(model)] == names
    for n, layer in noble_layers(model):  # weights kept exactly (Conv1D's transposed into the Linear layout)
        assert torch.equal(layer.weight, mains[n]), n
        assert (layer.weight is sites[n].weight) == (kinds[n] == "linear"), "nn.Linear's Parameter itself is kept"

    with torch.no_grad():
        branch_rms = _branch_outputs(model, x)  # and the model's output with the branches live
        ups = {n: layer.up.weight.clone() for n, layer in noble_layers(model)}
        for _, layer in noble_layers(model):
            layer.up.weight.zero_()
        exact = _out(model, x)
        for n, layer in noble_layers(model):
            layer.up.weight.copy_(ups[n])
    torch.testing.assert_close(exact, before, rtol=1e-5, atol=1e-5)  # the plain model's function, kept
    # Near zero in absolute terms (W_up ~ N(0, (0.01/sqrt r)^2): an output RMS of about 0.01), on the activations
    # the model really feeds each layer. Not near zero relative to these families' 0.02-std init, whose residual
    # projections output ~0.001-0.006 at init: the logits move visibly, as in any NOBLE model at init.
    assert set(branch_rms) == set(names) and max(branch_rms.values()) < 0.02, branch_rms

    model.train()
    _out(model, x).square().mean().backward()
    for n, layer in noble_layers(model):
        grad = layer.up.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, n


@pytest.mark.parametrize("targets, kept", [("attn", ("attn",)), ("mlp", ("mlp",))])
def test_attn_and_mlp_split_the_llama_block(targets, kept):
    names = apply_noble(_build("llama"), rank=RANK, targets=targets)
    parts = [p for p in LLAMA_PARTS if p.split(".")[0] in {"attn": "self_attn", "mlp": "mlp"}[kept[0]]]
    assert names == expected(["model.layers.0", "model.layers.1"], parts)


def test_alternate_and_globs_on_a_transformers_model():
    assert {n.split(".")[2] for n in apply_noble(_build("gpt2"), rank=RANK, targets="alternate")} == {"0"}
    assert apply_noble(_build("gpt2"), rank=RANK, targets="transformer.h.1.mlp.*") == [
        "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj"]
    # a glob may name a head on purpose: it is the user's choice, not the rule's
    assert apply_noble(_build("bert"), rank=RANK, targets="cls.predictions.transform.dense") == [
        "cls.predictions.transform.dense"]


def test_a_second_apply_refuses_layers_that_already_have_a_branch():
    model = _build("llama")
    apply_noble(model, rank=RANK, targets="mlp")
    assert apply_noble(model, rank=RANK, targets="attn")  # the rest still can
    with pytest.raises(NobleError, match="already has a NOBLE branch"):
        apply_noble(model, rank=RANK, targets="all")


def test_torchvision_attention_is_reported_not_branched():
    with pytest.raises(NobleError, match=r"self_attention.out_proj .*MultiheadAttention.forward reads its weight"):
        apply_noble(_build("tv_vit"), rank=RANK, targets="attn")
    with pytest.raises(NobleError, match=r"attn.qkv .*ShiftedWindowAttention.forward reads its weight"):
        apply_noble(_build("tv_swin"), rank=RANK, targets="attn")


# --- the structural rule on small hand-made models ----------------------------------------------------------------


class Expert(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class MoELayer(nn.Module):
    """A decoder layer whose feed-forward is a list of experts: a block list nested inside a block."""

    def __init__(self, d):
        super().__init__()
        self.mixer = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "out": nn.Linear(d, d)})  # no attention name at all
        self.experts = nn.ModuleList(Expert(d) for _ in range(2))


class Stage(nn.Module):
    """A Swin-like stage: a list of blocks plus one downsampling linear of its own."""

    def __init__(self, d):
        super().__init__()
        self.blocks = nn.ModuleList(MoELayer(d) for _ in range(2))
        self.reduction = nn.Linear(d, d)


def test_experts_belong_to_their_layer_and_stages_are_looked_into():
    model = nn.Sequential(nn.Embedding(10, 16), nn.ModuleList([Stage(16), Stage(16)]), nn.Linear(16, 10))
    assert [name for name, _, _ in find_blocks(model)] == ["1.0.blocks.0", "1.0.blocks.1", "1.1.blocks.0",
                                                           "1.1.blocks.1"]
    roles = {s.name: s.role for s in linear_sites(model)}
    # no class or attribute says attention: the first part with two linears (the mixer) is it, by position
    assert roles["1.0.blocks.0.mixer.qkv"] == roles["1.0.blocks.0.mixer.out"] == "attn"
    assert roles["1.0.blocks.1.experts.1.w2"] == "mlp"
    assert roles["1.0.reduction"] is None and roles["2"] is None


class NotLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x).relu()


def test_a_linear_subclass_with_another_forward_is_refused():
    model = nn.ModuleList(nn.ModuleDict({"attn": NotLinear(8, 8), "mlp": nn.Linear(8, 8)}) for _ in range(2))
    with pytest.raises(NobleError, match="attn is a NotLinear whose forward is not a plain linear map"):
        apply_noble(model, rank=2, targets="all")
    assert apply_noble(model, rank=2, targets="mlp") == ["0.mlp", "1.mlp"]


class ReadsWeight(nn.Module):
    """Attention that passes its output projection's weight to a function: a branch there would never run."""

    def __init__(self, d):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.linear(q * k * v, self.proj.weight, self.proj.bias)


class ChecksWeight(ReadsWeight):
    """Looks at the weight (as T5 does) but calls the module: the branch runs."""

    def forward(self, x):
        assert isinstance(self.proj.weight, torch.Tensor)
        return self.proj(self.qkv(x)[..., : x.shape[-1]])


@pytest.mark.parametrize("attention, skipped", [(ReadsWeight, True), (ChecksWeight, False)])
def test_weights_read_without_a_call_are_skipped(attention, skipped):
    model = nn.ModuleList(nn.ModuleDict({"attn": attention(8), "mlp": nn.Linear(8, 8)}) for _ in range(2))
    sites = {s.name: s for s in linear_sites(model)}
    assert (sites["0.attn.proj"].skip is not None) == skipped and sites["0.attn.qkv"].skip is None
    assert sites["0.attn.proj"].role == "attn" and sites["0.mlp"].role == "mlp"

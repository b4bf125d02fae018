"""`noble layers` and the layer list of `noble train --dry-run`: which layers, shapes, parameter and FLOP cost."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # transformers loads triton: the CPU kernel tests need this set before it does
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import run_noble as cli  # noqa: E402

from noble_cli import recipes as C  # noqa: E402
from noble_cli.layers_cli import report  # noqa: E402

pytest.importorskip("transformers")
pytest.importorskip("timm")




def per_layer(d_in: int, d_out: int, r: int) -> tuple[int, float]:
    """CosNet branch parameters (NOBLE.md: r(in+out) + r^2 + 6r) and its matmul FLOPs relative to the layer's."""
    return r * (d_in + d_out) + r * r + 6 * r, (d_in * r + r * r + r * d_out) / (d_in * d_out)


def test_gpt2_conv1d_layers_with_their_costs():
    rep = report("hf:gpt2")  # tiny sizes: d=128, 2 layers, MLP 512
    shapes = {c.site.name: (c.site.in_features, c.site.out_features) for c in rep.layers}
    assert shapes == {f"transformer.h.{i}.{n}": s for i in (0, 1) for n, s in
                      (("attn.c_attn", (128, 384)), ("attn.c_proj", (128, 128)), ("mlp.c_fc", (128, 512)),
                       ("mlp.c_proj", (512, 128)))}
    for c in rep.layers:
        params, flops = per_layer(c.site.in_features, c.site.out_features, 32)
        assert c.branch_params == params
        assert c.branch_flops / c.main_flops == pytest.approx(flops)
    assert rep.params_branch == sum(c.branch_params for c in rep.layers) and not rep.skipped


def test_the_cli_table_for_a_transformers_type_and_a_config_json(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "layers", "hf:llama")
    assert code == 0, err
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert re.search(rf"model\.layers\.\{{0\.\.1\}}\.(self_attn|mlp)\.{part} ", out), part
    assert "lm_head" not in out and "embed" not in out
    assert "14 layers get a branch" in out and "matmul FLOPs" in out
    # k_proj 128 -> 64 (GQA, 2 of 4 heads): its own row and FLOP ratio
    assert re.search(r"k_proj +│ attn +│ +128 -> 64 +│ +2 +│ +7,360 +│ .*│ +\+87\.50% +│", out)

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 3,
                                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96,
                                  "vocab_size": 100}))
    code, out, err = cli(monkeypatch, capsys, "layers", str(config), "--rank", "8", "--targets", "mlp", "--expand")
    assert code == 0, err
    assert re.findall(r"model\.layers\.(\d)\.mlp\.(\w+)", out) == [
        (str(i), p) for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")]


def test_recipes_timm_and_the_dry_run_list_the_same_layers(tmp_path, monkeypatch, capsys):
    rep = report("llm-tiny", rank=4)
    cfg = C.resolve("llm-tiny", {"noble.branch": "cosnet", "noble.rank": 4})
    assert (rep.params_total, rep.params_branch) == C.count_recipe_params(cfg)
    assert [c.site.name for c in rep.layers] == [f"blocks.{i}.{p}" for i in (0, 1)
                                                 for p in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc", "mlp.fc2")]

    code, out, err = cli(monkeypatch, capsys, "train", "llm-tiny", "--branch", "cosnet", "--rank", "4",
                         "--dry-run", "--out", str(tmp_path))
    assert code == 0, err
    assert "12 layers get a branch" in out and re.search(r"blocks\.\{0\.\.1\}\.mlp\.fc2 ", out)
    code, out, _ = cli(monkeypatch, capsys, "train", "llm-tiny", "--dry-run", "--out", str(tmp_path))
    assert "baseline: no layer gets a branch" in out

    code, out, err = cli(monkeypatch, capsys, "layers", "timm:vit_tiny_patch16_224", "--targets", "alternate")
    assert code == 0, err
    assert re.search(r"blocks\.\{0,2,\.\.,10\}\.attn\.qkv ", out) and "head" not in out.split("┃ layer")[1]


@pytest.mark.parametrize("args, message", [
    (["nope"], "unknown model or recipe 'nope'; valid: a recipe name"),
    (["hf:nope"], "unknown transformers model_type 'nope'; valid:"),
    (["timm:nope"], "unknown timm model 'nope'; valid:"),
    (["llm-tiny", "--targets", "heads"], "unknown target 'heads'; valid: all, attn, mlp, alternate"),
    (["hf:llama", "--branch", "relu6"], "unknown activation 'relu6'; valid:"),
    (["hf:llama", "--rank", "64"], "rank 64 is invalid for model.layers.0.self_attn.k_proj (128->64)"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "layers", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err

"""The hf_causal_lm task: a transformers causal LM from its config class (inline fields or a config.json), the
vocabulary from the tokenizer, one-line refusals, a short run into a run folder, and `noble sample` on it."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

if not torch.cuda.is_available():  # transformers loads triton: the CPU kernel tests need this set before it does
    os.environ.setdefault("TRITON_INTERPRET", "1")

from noble_cli import config as C  # noqa: E402
from noble_cli import recipes  # noqa: E402
from noble_cli.errors import NobleError  # noqa: E402
from noble_cli.layers import count_parameters, noble_layers  # noqa: E402
from noble_cli.sample import context_length, load_run, sample_text  # noqa: E402
from noble_cli.tasks import get_task  # noqa: E402
from noble_cli.train.run import train  # noqa: E402

pytest.importorskip("transformers")

SMALL = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
         "model.num_key_value_heads=1", "model.intermediate_size=64", "model.max_position_embeddings=32",
         "data.seq_len=32", "noble.rank=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


def build(*sets: str, recipe: str = "llama-bytes"):
    cfg = recipes.resolve(recipe, sets=[*SMALL, *sets])
    with torch.device("meta"):
        return get_task(cfg.task).build_module(cfg), cfg


def test_inline_llama_with_the_tokenizers_vocabulary_and_branches_on_its_seven_projections():
    module, _ = build("noble.branch=cosnet")
    config = module.model.config
    assert type(module.model).__name__ == "LlamaForCausalLM" and config.vocab_size == 257
    assert (config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (32, 1, True)
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    parts = {n.split(".", 3)[-1] for n, _ in noble_layers(module.model)}
    assert parts == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    gpt2_vocab, _ = build("data.tokenizer=gpt2")
    assert gpt2_vocab.model.config.vocab_size == 50257


def test_a_config_json_gives_the_family_and_fields_and_set_fields_override_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 48, "n_layer": 3, "n_head": 4, "n_positions": 64,
                                "vocab_size": 50257, "architectures": ["GPT2LMHeadModel"]}))
    sets = [f"model.config_json={path}", "model.model_type=null", "model.num_hidden_layers=2",
            "model.num_key_value_heads=null", "model.intermediate_size=null", "model.hidden_size=null",
            "model.num_attention_heads=null", "model.extra={}", "noble.branch=cosnet"]
    module, cfg = build(*sets)
    config = module.model.config
    assert (config.model_type, config.n_embd, config.n_layer, config.vocab_size) == ("gpt2", 48, 2, 257)
    assert config.eos_token_id == 256, "GPT-2's end-of-text id 50256 is outside the byte vocabulary: moved to ours"
    assert len(noble_layers(module.model)) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj: Conv1D made NobleLinear
    assert "gpt2" in get_task("hf_causal_lm").data_summary(cfg)


@pytest.mark.parametrize("sets, message", [
    (["model.model_type=no_such"], "unknown transformers model_type 'no_such'; valid: a causal-LM type"),
    (["model.model_type=vit"], "transformers model_type 'vit' has no causal-LM class; valid: e.g. llama"),
    (["model.extra={vocab_size: 300}"], "model.extra.vocab_size cannot be set: the vocabulary is the data's"),
    (["model.extra={hidden_size: 64}"], "model.extra.hidden_size duplicates a field of its own: set model.hidden_size"),
    (["model.extra={no_such_field: 1}"], "model.extra.no_such_field is not a field of transformers' LlamaConfig"),
    (["model.model_type=gpt2", "model.num_key_value_heads=null", "model.extra={}"],
     "model.intermediate_size is not a field of transformers' GPT2Config (gpt2)"),
    (["model.model_type=null"], "model.model_type or model.config_json must be set"),
    (["model.config_json=/no/such/config.json"], "cannot read model.config_json /no/such/config.json"),
    (["data.seq_len=64"], "data.seq_len must be in [1, max_position_embeddings = 32], got 64"),
    (["model.hidden_size=0"], "model.hidden_size must be >= 1, got 0"),
])
def test_bad_model_sections_are_one_line(sets, message):
    with pytest.raises(NobleError, match=re.escape(message)):
        recipes.resolve("llama-bytes", sets=[*SMALL, *sets])


def test_the_dense_matched_control_widens_the_gated_mlp_to_noble_s_parameter_count():
    noble, _ = build("noble.branch=cosnet")
    dense, cfg = build("noble.dense_match=true")
    target = count_parameters(noble.model).total
    assert cfg.model.intermediate_size == 64 and dense.model.config.intermediate_size > 64
    assert dense.model.model.layers[0].mlp.up_proj.out_features == dense.model.config.intermediate_size
    assert abs(count_parameters(dense.model).total - target) <= 3 * 32 * 2  # one unit of width x 3 matrices x 2 blocks


def test_a_short_run_fills_its_folder_and_noble_sample_reads_it(tmp_path):
    cfg = recipes.resolve("llama-bytes", sets=[*SMALL, "noble.branch=cosnet", "trainer.max_steps=4",
                                               "trainer.eval_every=2", "trainer.eval_batches=1",
                                               "trainer.batch_size=4", "optim.name=muon"])
    result = train(cfg, out=tmp_path, progress=False)
    assert result.summary["status"] == "completed" and result.run_dir.name == C.run_id(cfg)
    assert result.meta["task"] == "hf_causal_lm" and result.meta["params_branch"] > 0
    metrics = (result.run_dir / "metrics.csv").read_text()
    assert "eval_bpb" in metrics.splitlines()[0]
    model, loaded, tok = load_run(result.run_dir, "last")
    assert type(model).__name__ == "LlamaForCausalLM" and context_length(model) == 32
    assert loaded.task == "hf_causal_lm" and noble_layers(model) and tok.name == "bytes"
    text = sample_text(result.run_dir, prompt="The ", tokens=12, temperature=0.8, seed=1)
    assert text.startswith("The ") and len(text.encode()) > 4
    assert text == sample_text(result.run_dir, prompt="The ", tokens=12, temperature=0.8, seed=1)

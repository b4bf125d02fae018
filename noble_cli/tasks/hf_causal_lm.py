"""Causal language modelling with any transformers causal-LM family, trained from scratch (recipes llama-bytes,
llama-250m).

The model is built from its config class alone (no hub, no weights): `model_type` and sizes inline, or a local
config.json, with `extra` for any other field of that class; the vocabulary is the data's tokenizer's (`data.tokenizer:
gpt2 | bytes`). Everything else is the causal-LM task's: the same data module and shards, loss, eval_loss and
eval_bpb, run folders, resume, sweeps and reports. NOBLE's branches go in through `apply_noble`, which finds the
family's blocks and projections from its structure (noble_cli/layers/targets.py), like every task's.
transformers is the optional extra `pip install "noble-cli[hf]"`: without it, resolving a recipe of this task is a
one-line error.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from noble_cli.config import ConfigModel, Int, RunConfig, Str
from noble_cli.errors import NobleError
from noble_cli.layers.targets import find_blocks
from noble_cli.models.transformer import lm_flops_per_token
from noble_cli.tasks.causal_lm import CausalLM, CausalLMTask, LMDataConfig, get_tokenizer, random_tokens

# The sizes a recipe sets as typed fields (transformers' common names; GPT-2's config maps them onto n_embd, ...).
SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
         "max_position_embeddings")


class HFCausalLMConfig(ConfigModel):
    """A transformers causal LM built from its config class (a recipe's `model:` section for task hf_causal_lm).
    The fields set here override a config.json's; those left out keep its values, else the family's defaults."""

    model_type: Str | None = None
    """A transformers model type with a causal-LM class: llama, qwen2, mistral, gpt2, gpt_neox, falcon, ... May be
    left out when config_json names it."""
    config_json: Str | None = None
    """A local transformers config.json (read for its fields; its weights are never looked for)."""
    hidden_size: Int | None = Field(None, ge=1)
    """Model width."""
    num_hidden_layers: Int | None = Field(None, ge=1)
    """Transformer blocks."""
    num_attention_heads: Int | None = Field(None, ge=1)
    num_key_value_heads: Int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention; = num_attention_heads for plain multi-head attention)."""
    intermediate_size: Int | None = Field(None, ge=1)
    """MLP hidden width (for Llama-style gated MLPs, the width of gate and up)."""
    max_position_embeddings: Int | None = Field(None, ge=1)
    """The longest context (data.seq_len must fit)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Any other field of the family's config class, passed as is: tie_word_embeddings, rms_norm_eps,
    attention_dropout, rope_parameters, hidden_act, ... Not vocab_size: that is the tokenizer's."""

    @model_validator(mode="after")
    def _a_source_and_no_duplicates(self) -> HFCausalLMConfig:
        if not self.model_type and not self.config_json:
            raise ValueError("model.model_type or model.config_json must be set, e.g. model_type: llama")
        for key in self.extra:
            if key == "vocab_size":
                raise ValueError("model.extra.vocab_size cannot be set: the vocabulary is the data's tokenizer's "
                                 "(data.tokenizer: gpt2 | bytes)")
            if key in SIZES or key in ("model_type", "config_json"):
                raise ValueError(f"model.extra.{key} duplicates a field of its own: set model.{key}")
        return self

    def sizes(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SIZES if getattr(self, k) is not None}

    def hf_config(self, tokenizer: str):
        """The transformers config, with the vocabulary of `tokenizer` (data.tokenizer)."""
        from noble_cli.models.external import causal_lm_config

        tok = get_tokenizer(tokenizer)
        return causal_lm_config(self.model_type, self.config_json, self.sizes(), self.extra, tok.vocab_size,
                                tok.eot_id)

    # The dense-matched control widens the MLP (the WidensMLP contract of tasks/base.py).
    @property
    def mlp_hidden(self) -> int:
        """The MLP's hidden width: intermediate_size, set here or by the config.json / the family's default."""
        width = self.intermediate_size or getattr(self.hf_config("bytes"), "intermediate_size", None)
        if not isinstance(width, int):
            raise NobleError(f"the dense-matched control widens model.intermediate_size, which transformers' "
                             f"{self.model_type or 'config.json'} config does not have; valid: families with it "
                             "(llama, qwen2, mistral, ...)")
        return width

    def with_mlp_hidden(self, width: int) -> HFCausalLMConfig:
        return self.model_copy(update={"intermediate_size": int(width)})


def hf_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model checkpoints its layers (the property's name changed within transformers 5)."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(flag if flag is not None else getattr(model, "is_gradient_checkpointing", False))


class HFCausalLM(CausalLM):
    """The causal-LM module with a transformers model: only building it and reading its logits differ."""

    def make_model(self, model_cfg: HFCausalLMConfig) -> nn.Module:
        from noble_cli.models.external import causal_lm

        return causal_lm(model_cfg.hf_config(self.data_cfg.tokenizer))

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=idx, use_cache=False).logits

    def configure_model(self) -> None:
        t = self.cfg.trainer
        # transformers checkpoints its own decoder layers; under FSDP Lightning does it (train/run.py)
        if t.activation_checkpointing and t.strategy != "fsdp" and not hf_checkpointing(self.model):
            if hasattr(self.model, "activation_checkpointing_enable"):  # its name since transformers 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def block_types(self) -> set[type]:
        return {type(block) for _, block, _ in find_blocks(self.model)}

    def data_identity(self) -> dict:
        """The config.json's content: the config names it by path, and a resume must not read another one."""
        path = self.model_cfg.config_json
        if not path:
            return {}
        return {"config_json_sha256": hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()}

    def flops_per_item(self) -> float:
        """Training FLOPs per token, counted as for the built-in GPT."""
        c = self.model.config
        return lm_flops_per_token(self.model, c.num_hidden_layers, c.hidden_size, self.seq_len)


class HFCausalLMTask(CausalLMTask):
    name = "hf_causal_lm"
    model_class = HFCausalLMConfig
    data_class = LMDataConfig

    def check(self, cfg: RunConfig) -> None:
        from noble_cli.data.shards import resolve_dataset

        config = cfg.model.hf_config(cfg.data.tokenizer)  # the family, its fields and the file: one line each
        context = getattr(config, "max_position_embeddings", None)
        if isinstance(context, int) and cfg.data.seq_len > context:
            raise NobleError(f"data.seq_len must be in [1, max_position_embeddings = {context}], got "
                             f"{cfg.data.seq_len}; set model.max_position_embeddings")
        resolve_dataset(cfg.data.dataset)

    def build_module(self, cfg: RunConfig) -> HFCausalLM:
        return HFCausalLM(cfg)

    def check_vocabulary(self, cfg: RunConfig, tok) -> None:
        """Nothing to check: the model's vocabulary is made from the tokenizer."""

    def synthetic_batch(self, module: HFCausalLM, batch_size: int, generator: torch.Generator):
        return random_tokens(module.model.config.vocab_size, batch_size, module.seq_len, generator)

    def data_summary(self, cfg: RunConfig) -> str:
        return f"{super().data_summary(cfg)}, transformers {cfg.model.hf_config(cfg.data.tokenizer).model_type}"


TASK = HFCausalLMTask()

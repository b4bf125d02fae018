"""Causal language modelling with a GPT (recipes llm-tiny, llm-small, llm-250m, llm-1.5b)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from noble_cli.config import RunConfig
from noble_cli.errors import NobleError
from noble_cli.models.gpt import GPT, GPTConfig
from noble_cli.tasks.base import NobleTask

ModelConfig = GPTConfig


@dataclass
class DataConfig:
    dataset: str = "embedded"  # embedded | openwebtext | fineweb-edu | hf:NAME[:CONFIG] | path to txt/jsonl/parquet
    seq_len: int = 256
    cache_dir: str | None = None  # default: $NOBLE_DATA_DIR or ~/.cache/noble/data


def check_gpt_shape(m: GPTConfig) -> None:
    """What GPT itself would fail on mid-run (or at build time with a Python error)."""
    for name in ("n_layer", "n_head", "d_model", "block_size", "pad_vocab_to"):
        if getattr(m, name) < 1:
            raise NobleError(f"model.{name} must be >= 1, got {getattr(m, name)}")
    if m.d_model % m.n_head:
        raise NobleError(f"model.d_model {m.d_model} must be divisible by model.n_head {m.n_head}")
    if m.mlp_ratio <= 0:
        raise NobleError(f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    if not 0.0 <= m.dropout < 1.0:
        raise NobleError(f"model.dropout must be in [0, 1), got {m.dropout}")


def check(cfg: RunConfig) -> None:
    from noble_cli.data.shards import resolve_dataset

    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    check_gpt_shape(m)
    if d.seq_len < 1 or d.seq_len > m.block_size:
        raise NobleError(f"data.seq_len must be in [1, model.block_size = {m.block_size}], got {d.seq_len}")
    resolve_dataset(d.dataset)  # an unknown name fails here, at --dry-run, not after the run folder exists


class CausalLM(NobleTask):
    items_name = "tokens"

    def make_model(self, model_cfg: GPTConfig) -> GPT:
        return GPT(model_cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch):
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)), {}

    def items_in(self, batch) -> int:
        return batch[0].numel()

    @property
    def seq_len(self) -> int:
        """Tokens per training sequence."""
        return self.data_cfg.seq_len

    def flops_per_item(self) -> float:
        return self.model.flops_per_token(self.seq_len)


def build_module(cfg: RunConfig) -> CausalLM:
    return CausalLM(cfg, ModelConfig(**cfg.model), DataConfig(**cfg.data))


def build_datamodule(cfg: RunConfig):
    from noble_cli.data.lm_datamodule import LMDataModule
    from noble_cli.data.tokenizer import VOCAB_SIZE

    d = DataConfig(**cfg.data)
    vocab = ModelConfig(**cfg.model).vocab_size
    # checked with the data, not in `check`: `noble bench` runs small vocabularies on random ids
    if vocab < VOCAB_SIZE:
        raise NobleError(f"model.vocab_size {vocab} is smaller than the GPT-2 vocabulary the text data is "
                         f"tokenized with ({VOCAB_SIZE})")
    t = cfg.trainer
    return LMDataModule(
        data=d.dataset, seq_len=d.seq_len, batch_size=t.batch_size, seed=cfg.seed, eval_batches=t.eval_batches,
        num_workers=t.num_workers, cache_dir=d.cache_dir, max_steps=t.max_steps * t.accumulate,
    )


def data_summary(cfg: RunConfig) -> str:
    d = DataConfig(**cfg.data)
    return f"{d.dataset} (GPT-2 BPE, seq {d.seq_len})"

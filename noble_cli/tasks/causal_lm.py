"""Causal language modelling with a GPT (recipes llm-tiny, llm-small, llm-250m, llm-1.5b)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from noble_cli.config import ConfigModel, Int, RunConfig, Str
from noble_cli.errors import NobleError
from noble_cli.models.gpt import GPT, GPTConfig
from noble_cli.tasks.base import NobleTask
from noble_cli.tasks.spec import Task


class LMDataConfig(ConfigModel):
    """Text for a causal LM, tokenized into cached shards."""

    dataset: Str = "embedded"
    """embedded | openwebtext | fineweb-edu | hf:NAME[:CONFIG] | a path to txt/jsonl/parquet files."""
    seq_len: Int = Field(256, ge=1)
    """Tokens per training sequence (at most model.block_size)."""
    cache_dir: Str | None = None
    """Where shards are cached; default: $NOBLE_DATA_DIR or ~/.cache/noble/data."""


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


def random_tokens(vocab_size: int, batch_size: int, seq_len: int, generator: torch.Generator):
    """A language-model batch of random token ids: (inputs, next-token targets), and the tokens it counts."""
    x = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
    return (x[:, :-1].contiguous(), x[:, 1:].contiguous()), batch_size * seq_len


class CausalLMTask(Task):
    name = "causal_lm"
    model_class = GPTConfig
    data_class = LMDataConfig

    def check(self, cfg: RunConfig) -> None:
        from noble_cli.data.shards import resolve_dataset

        if cfg.data.seq_len > cfg.model.block_size:
            raise NobleError(f"data.seq_len must be in [1, model.block_size = {cfg.model.block_size}], got "
                             f"{cfg.data.seq_len}")
        resolve_dataset(cfg.data.dataset)  # an unknown name fails here, at --dry-run, not after the run folder exists

    def build_module(self, cfg: RunConfig) -> CausalLM:
        return CausalLM(cfg)

    def build_datamodule(self, cfg: RunConfig):
        from noble_cli.data.lm_datamodule import LMDataModule
        from noble_cli.data.tokenizer import VOCAB_SIZE

        d, t = cfg.data, cfg.trainer
        # checked with the data, not in `check`: `noble bench` runs small vocabularies on random ids
        if cfg.model.vocab_size < VOCAB_SIZE:
            raise NobleError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the GPT-2 vocabulary the text "
                             f"data is tokenized with ({VOCAB_SIZE})")
        return LMDataModule(
            data=d.dataset, seq_len=d.seq_len, batch_size=t.batch_size, seed=cfg.seed, eval_batches=t.eval_batches,
            num_workers=t.num_workers, cache_dir=d.cache_dir, max_steps=t.max_steps * t.accumulate,
        )

    def synthetic_batch(self, module: CausalLM, batch_size: int, generator: torch.Generator):
        return random_tokens(module.model_cfg.vocab_size, batch_size, module.seq_len, generator)

    def data_summary(self, cfg: RunConfig) -> str:
        return f"{cfg.data.dataset} (GPT-2 BPE, seq {cfg.data.seq_len})"


TASK = CausalLMTask()

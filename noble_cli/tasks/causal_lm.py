"""Causal language modelling with a GPT (recipes llm-bytes, llm-tiny, llm-small, llm-250m, llm-1.5b).

Text is tokenized with GPT-2's BPE (`data.tokenizer: gpt2`) or as UTF-8 bytes (`data.tokenizer: bytes`). Logged at
every evaluation, over the fixed validation windows: eval_loss (mean next-token NLL, nats per token) and eval_bpb,
bits per byte = sum of the targets' NLL in nats / (ln 2 x the UTF-8 bytes those targets stand for), end-of-text
counting 0 bytes. Per token, eval_loss depends on the tokenizer; per byte, models with different tokenizers
compare. Both are sums over the whole evaluation set (across devices too), not means of per-batch ratios.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from pydantic import Field, field_validator

from noble_cli.config import ConfigModel, Int, RunConfig, Str, added_field
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
    tokenizer: Str = added_field("gpt2")
    """gpt2 (BPE, 50,257 ids) | bytes (UTF-8 bytes + end-of-text, 257 ids)."""

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, name: str) -> str:
        get_tokenizer(name)
        return name


def get_tokenizer(name: str):
    from noble_cli.data.text_tokenizers import get_tokenizer as get

    try:
        return get(name)
    except NobleError as e:
        raise NobleError(f"data.tokenizer: {e}") from None


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Summed NLL in nats over targets that stand for `n_bytes` UTF-8 bytes -> bits per byte (nan for 0 bytes)."""
    return nll_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


class BitsPerByte(torchmetrics.Metric):
    """Sums of target NLL (nats) and target bytes over an evaluation, across devices; computes bits per byte."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, n_bytes: torch.Tensor) -> None:
        self.nll += nll_sum.detach().to(torch.float64)
        self.bytes += n_bytes.detach().to(torch.int64)

    def compute(self) -> torch.Tensor:
        return torch.tensor(bits_per_byte(float(self.nll), int(self.bytes)), dtype=torch.float32)


class CausalLM(NobleTask):
    items_name = "tokens"

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        # text LMs only (the image-token task reuses this class with data that has no tokenizer)
        self.tokenizer_name = getattr(self.data_cfg, "tokenizer", None)
        self.eval_bpb = BitsPerByte() if self.tokenizer_name else None
        self._token_bytes: torch.Tensor | None = None  # filled at the first evaluation, on the model's device

    def make_model(self, model_cfg: GPTConfig) -> GPT:
        return GPT(model_cfg)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> next-token logits (B, T, vocab): what the loss and the evaluation read."""
        return self.model(idx)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits(idx)

    def loss(self, batch):
        x, y = batch
        logits = self.logits(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)), {}

    def token_bytes(self, device: torch.device) -> torch.Tensor:
        """The UTF-8 bytes each id stands for (a table of the vocabulary; ids past the tokenizer's count 0)."""
        if self._token_bytes is None or self._token_bytes.device != device:
            table = get_tokenizer(self.tokenizer_name).token_bytes()
            full = np.zeros(max(len(table), getattr(self.model_cfg, "vocab_size", 0)), dtype=np.int64)
            full[: len(table)] = table
            self._token_bytes = torch.from_numpy(full).to(device)
        return self._token_bytes

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.logits(x).float()
        nll = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none")
        self.log("eval_loss", nll.mean(), on_epoch=True, sync_dist=True, prog_bar=False)
        if self.eval_bpb is not None:
            self.eval_bpb.update(nll.sum(), self.token_bytes(y.device)[y].sum())
            # a Metric object: Lightning computes (syncs) it once at the evaluation's end and then resets it
            self.log("eval_bpb", self.eval_bpb, on_epoch=True, on_step=False, prog_bar=False)

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

        d, t = cfg.data, cfg.trainer
        tok = get_tokenizer(d.tokenizer)
        self.check_vocabulary(cfg, tok)
        return LMDataModule(
            data=d.dataset, seq_len=d.seq_len, batch_size=t.batch_size, seed=cfg.seed, eval_batches=t.eval_batches,
            num_workers=t.num_workers, cache_dir=d.cache_dir, max_steps=t.micro_batches,
            tokenizer=tok.name,
        )

    def text_tokenizer(self, cfg: RunConfig):
        return get_tokenizer(cfg.data.tokenizer)

    def check_vocabulary(self, cfg: RunConfig, tok) -> None:
        """The model's vocabulary holds the tokenizer's ids. Checked with the data, not in `check`: `noble bench`
        runs small vocabularies on random ids."""
        if cfg.model.vocab_size < tok.vocab_size:
            raise NobleError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the {tok.title} vocabulary "
                             f"the text data is tokenized with ({tok.vocab_size}); set "
                             f"model.vocab_size={tok.vocab_size}")

    def synthetic_batch(self, module: CausalLM, batch_size: int, generator: torch.Generator):
        return random_tokens(module.model_cfg.vocab_size, batch_size, module.seq_len, generator)

    def data_summary(self, cfg: RunConfig) -> str:
        return f"{cfg.data.dataset} ({get_tokenizer(cfg.data.tokenizer).label}, seq {cfg.data.seq_len})"


TASK = CausalLMTask()

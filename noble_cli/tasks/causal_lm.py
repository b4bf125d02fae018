"""Causal language modelling with a GPT (recipes llm-bytes, llm-tiny, llm-small, llm-250m, llm-1.5b).

Text is tokenized with GPT-2's BPE (`data.tokenizer: gpt2`) or as UTF-8 bytes (`data.tokenizer: bytes`). Logged at
every evaluation, over the fixed validation windows: eval_loss (mean next-token NLL, nats per token) and eval_bpb,
bits per byte = sum of the targets' NLL in nats / (ln 2 x the UTF-8 bytes those targets stand for), end-of-text
counting 0 bytes. Per token, eval_loss depends on the tokenizer; per byte, models with different tokenizers
compare. Both are sums over the whole evaluation set (across devices too), not means of per-batch ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from noble_cli.config import RunConfig, added_field
from noble_cli.errors import NobleError
from noble_cli.models.gpt import GPT, GPTConfig
from noble_cli.tasks.base import NobleTask

ModelConfig = GPTConfig


@dataclass
class DataConfig:
    dataset: str = "embedded"  # embedded | openwebtext | fineweb-edu | hf:NAME[:CONFIG] | path to txt/jsonl/parquet
    seq_len: int = 256
    cache_dir: str | None = None  # default: $NOBLE_DATA_DIR or ~/.cache/noble/data
    tokenizer: str = added_field("gpt2")  # gpt2 (BPE, 50,257 ids) | bytes (UTF-8 bytes + end-of-text, 257 ids)


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
    get_tokenizer(d.tokenizer)


def get_tokenizer(name: str):
    from noble_cli.data.text_tokenizers import get_tokenizer as get

    try:
        return get(name)
    except NobleError as e:
        raise NobleError(f"data.tokenizer: {e}") from None


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Summed NLL in nats over targets that stand for `n_bytes` UTF-8 bytes -> bits per byte (nan for 0 bytes)."""
    return nll_nats / (math.log(2) * n_bytes) if n_bytes else float("nan")


class BitsPerByte(Metric):
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

    def __init__(self, cfg: RunConfig, model_cfg, data_cfg):
        super().__init__(cfg, model_cfg, data_cfg)
        # text LMs only (the image-token task reuses this class with a DataConfig that has no tokenizer)
        self.tokenizer_name = getattr(data_cfg, "tokenizer", None)
        self.eval_bpb = BitsPerByte() if self.tokenizer_name else None
        self._token_bytes: torch.Tensor | None = None  # filled at the first evaluation, on the model's device

    def make_model(self, model_cfg: GPTConfig) -> GPT:
        return GPT(model_cfg)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, batch):
        x, y = batch
        logits = self.model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1)), {}

    def token_bytes(self, device: torch.device) -> torch.Tensor:
        """The UTF-8 bytes each id stands for (a table of the vocabulary; ids past the tokenizer's count 0)."""
        if self._token_bytes is None or self._token_bytes.device != device:
            table = get_tokenizer(self.tokenizer_name).token_bytes()
            full = np.zeros(max(len(table), self.model_cfg.vocab_size), dtype=np.int64)
            full[: len(table)] = table
            self._token_bytes = torch.from_numpy(full).to(device)
        return self._token_bytes

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x).float()
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


def build_module(cfg: RunConfig) -> CausalLM:
    return CausalLM(cfg, ModelConfig(**cfg.model), DataConfig(**cfg.data))


def build_datamodule(cfg: RunConfig):
    from noble_cli.data.lm_datamodule import LMDataModule

    d = DataConfig(**cfg.data)
    tok = get_tokenizer(d.tokenizer)
    vocab = ModelConfig(**cfg.model).vocab_size
    # checked with the data, not in `check`: `noble bench` runs small vocabularies on random ids
    if vocab < tok.vocab_size:
        raise NobleError(f"model.vocab_size {vocab} is smaller than the {tok.title} vocabulary the text data is "
                         f"tokenized with ({tok.vocab_size}); set model.vocab_size={tok.vocab_size}")
    t = cfg.trainer
    return LMDataModule(
        data=d.dataset, seq_len=d.seq_len, batch_size=t.batch_size, seed=cfg.seed, eval_batches=t.eval_batches,
        num_workers=t.num_workers, cache_dir=d.cache_dir, max_steps=t.max_steps * t.accumulate,
        tokenizer=tok.name,
    )


def data_summary(cfg: RunConfig) -> str:
    d = DataConfig(**cfg.data)
    return f"{d.dataset} ({get_tokenizer(d.tokenizer).label}, seq {d.seq_len})"

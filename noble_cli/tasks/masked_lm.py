"""Masked language modelling with a BERT encoder (recipes bert-tiny, bert-base).

Objective: BERT's masked LM without next-sentence prediction — 15% of the tokens chosen, 80% of those [MASK], 10% a
random token, 10% unchanged; cross-entropy on the chosen tokens only. Logged: train_loss / eval_loss (MLM loss on
the chosen tokens), train_acc / eval_acc (masked-token accuracy), tokens/s (every input token counts). Evaluation
runs on a fixed masked validation set: the same windows and the same masks at every evaluation
(`noble_cli.data.mlm`). The WordPiece vocabulary is trained on the corpus (cached) unless `data.vocab` names a
BERT vocab.txt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from noble_cli.config import RunConfig
from noble_cli.errors import NobleError
from noble_cli.models.bert import BERT, NORMS, BertConfig
from noble_cli.tasks.base import NobleTask

ModelConfig = BertConfig


@dataclass
class DataConfig:
    dataset: str = "embedded"  # embedded | openwebtext | fineweb-edu | hf:NAME[:CONFIG] | path to txt/jsonl/parquet
    seq_len: int = 128  # [CLS] + seq_len - 2 packed tokens + [SEP]
    vocab: str | None = None  # a BERT vocab.txt to use (e.g. bert-base-uncased's); null: train one (model.vocab_size)
    lowercase: bool = True  # uncased WordPiece (lower-case, strip accents)
    tokenizer_every: int = 1  # train the vocabulary on every Nth document (1 = all)
    limit: int | None = None  # at most this many documents per embedded source (or in all, HF/local): quick subsets
    mlm_probability: float = 0.15
    mask_ratio: float = 0.8  # of the chosen tokens: replaced by [MASK]
    random_ratio: float = 0.1  # ... by a random token (the rest stay unchanged)
    eval_seed: int = 0  # the fixed eval masks' seed (not the run's: every seed is scored on the same masked set)
    cache_dir: str | None = None  # data root for vocab + shards; default: $NOBLE_DATA_DIR or ~/.cache/noble/data


def check(cfg: RunConfig) -> None:
    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    if d.seq_len > m.max_position:
        raise NobleError(f"data.seq_len {d.seq_len} exceeds model.max_position {m.max_position}")
    if d.seq_len < 3:
        raise NobleError(f"data.seq_len must be >= 3 ([CLS] token [SEP]), got {d.seq_len}")
    if m.d_model % m.n_head:
        raise NobleError(f"model.d_model {m.d_model} must be divisible by model.n_head {m.n_head}")
    if m.norm not in NORMS:
        raise NobleError(f"model.norm must be one of {', '.join(NORMS)}, got {m.norm!r}")
    if not 5 < m.vocab_size <= 1 << 16:
        raise NobleError(f"model.vocab_size must be in (5, 65536] (ids are stored as uint16), got {m.vocab_size}")
    if not 0.0 < d.mlm_probability < 1.0:
        raise NobleError(f"data.mlm_probability must be in (0, 1), got {d.mlm_probability}")
    if d.mask_ratio < 0 or d.random_ratio < 0 or d.mask_ratio + d.random_ratio > 1.0:
        raise NobleError(f"data.mask_ratio + data.random_ratio must be within [0, 1], got {d.mask_ratio} + "
                         f"{d.random_ratio}")
    if d.tokenizer_every < 1:
        raise NobleError(f"data.tokenizer_every must be >= 1, got {d.tokenizer_every}")
    if d.limit is not None and d.limit < 1:
        raise NobleError(f"data.limit must be >= 1, got {d.limit}")
    from noble_cli.data.shards import resolve_dataset

    if resolve_dataset(d.dataset).kind == "shards":
        raise NobleError(f"data.dataset {d.dataset!r} is a prepared GPT-2 shard folder; the masked-LM task "
                         "tokenizes raw text itself (embedded, an HF dataset, or .txt/.jsonl/.parquet files)")
    if d.vocab is not None:
        from noble_cli.data.wordpiece import load_vocab

        size = load_vocab(d.vocab, d.lowercase).vocab_size
        if size > m.vocab_size:
            raise NobleError(f"data.vocab has {size} tokens, more than model.vocab_size {m.vocab_size}")


class MaskedLM(NobleTask):
    items_name = "tokens"

    def make_model(self, model_cfg: BertConfig) -> BERT:
        return BERT(model_cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask=attention_mask)

    def masked_lm(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) over the chosen tokens (labels != -100)."""
        logits, targets = self.model(batch["input_ids"], labels=batch["labels"],
                                     attention_mask=batch.get("attention_mask"))
        if targets.numel() == 0:  # no token chosen (only possible with tiny batches)
            zero = logits.sum() * 0.0
            return zero, zero.detach()
        loss = F.cross_entropy(logits.float(), targets)
        acc = (logits.detach().argmax(-1) == targets).float().mean()
        return loss, acc

    def loss(self, batch):
        loss, acc = self.masked_lm(batch)
        return loss, {"acc": acc}

    def evaluate(self, batch) -> dict[str, torch.Tensor]:
        loss, acc = self.masked_lm(batch)
        return {"loss": loss, "acc": acc}

    def items_in(self, batch) -> int:
        return batch["input_ids"].numel()

    def flops_per_item(self) -> float:
        return self.model.flops_per_token(self.data_cfg.seq_len, self.data_cfg.mlm_probability)


def build_module(cfg: RunConfig) -> MaskedLM:
    return MaskedLM(cfg, ModelConfig(**cfg.model), DataConfig(**cfg.data))


def build_datamodule(cfg: RunConfig):
    from noble_cli.data.mlm import MLMDataModule

    m, d, t = ModelConfig(**cfg.model), DataConfig(**cfg.data), cfg.trainer
    return MLMDataModule(
        data=d.dataset, seq_len=d.seq_len, batch_size=t.batch_size, seed=cfg.seed, eval_batches=t.eval_batches,
        num_workers=t.num_workers, vocab_size=m.vocab_size, vocab=d.vocab, lowercase=d.lowercase,
        tokenizer_every=d.tokenizer_every, limit=d.limit, mlm_probability=d.mlm_probability,
        mask_ratio=d.mask_ratio, random_ratio=d.random_ratio, eval_seed=d.eval_seed, cache_dir=d.cache_dir,
        max_steps=t.max_steps * t.accumulate,
    )


def data_summary(cfg: RunConfig) -> str:
    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    case = "uncased" if d.lowercase else "cased"
    if d.vocab:
        vocab = f"WordPiece {d.vocab}"
    else:
        sample = "" if d.tokenizer_every == 1 else f", vocab from every {d.tokenizer_every}th doc"
        vocab = f"WordPiece {m.vocab_size} {case}{sample}"
    limit = f", {d.limit} docs/source" if d.limit else ""
    return f"{d.dataset} ({vocab}{limit}; seq {d.seq_len}, {d.mlm_probability:.0%} masked)"

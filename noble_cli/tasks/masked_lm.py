"""Masked language modelling with a BERT encoder (recipes bert-tiny, bert-base).

Objective: BERT's masked LM without next-sentence prediction — 15% of the tokens chosen, 80% of those [MASK], 10% a
random token, 10% unchanged; cross-entropy on the chosen tokens only. Logged: train_loss / eval_loss (MLM loss on
the chosen tokens), train_acc / eval_acc (masked-token accuracy), tokens/s (every input token counts). Evaluation
runs on a fixed masked validation set: the same windows and the same masks at every evaluation
(`noble_cli.data.mlm`). The WordPiece vocabulary is trained on the corpus (cached) unless `data.vocab` names a
BERT vocab.txt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from noble_cli.config import ConfigModel, Float, Int, RunConfig, Str
from noble_cli.errors import NobleError
from noble_cli.models.bert import BERT, BertConfig
from noble_cli.tasks.base import NobleTask
from noble_cli.tasks.spec import Task


class MLMDataConfig(ConfigModel):
    """Text for masked-LM pretraining: tokenized with a WordPiece vocabulary, masked BERT's way."""

    dataset: Str = "embedded"
    """embedded | openwebtext | fineweb-edu | hf:NAME[:CONFIG] | a path to txt/jsonl/parquet files."""
    seq_len: Int = Field(128, ge=3)
    """[CLS] + seq_len - 2 packed tokens + [SEP]."""
    vocab: Str | None = None
    """A BERT vocab.txt to use (e.g. bert-base-uncased's); null: train one of model.vocab_size on the corpus."""
    lowercase: bool = True
    """Uncased WordPiece (lower-case, strip accents)."""
    tokenizer_every: Int = Field(1, ge=1)
    """Train the vocabulary on every Nth document (1 = all)."""
    limit: Int | None = Field(None, ge=1)
    """At most this many documents per embedded source (or in all, HF/local): quick subsets."""
    mlm_probability: Float = Field(0.15, gt=0, lt=1)
    mask_ratio: Float = Field(0.8, ge=0, le=1)
    """Of the chosen tokens: replaced by [MASK]."""
    random_ratio: Float = Field(0.1, ge=0, le=1)
    """... by a random token (the rest stay unchanged)."""
    eval_seed: Int = 0
    """The fixed eval masks' seed (not the run's: every seed is scored on the same masked set)."""
    cache_dir: Str | None = None
    """Data root for the vocabulary and shards; default: $NOBLE_DATA_DIR or ~/.cache/noble/data."""

    @model_validator(mode="after")
    def _ratios_fit(self) -> MLMDataConfig:
        if self.mask_ratio + self.random_ratio > 1.0:
            raise ValueError(f"data.mask_ratio + data.random_ratio must be within [0, 1], got {self.mask_ratio} + "
                             f"{self.random_ratio}")
        return self


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


class MaskedLMTask(Task):
    name = "masked_lm"
    model_class = BertConfig
    data_class = MLMDataConfig

    def check(self, cfg: RunConfig) -> None:
        from noble_cli.data.shards import resolve_dataset

        m, d = cfg.model, cfg.data
        if d.seq_len > m.max_position:
            raise NobleError(f"data.seq_len {d.seq_len} exceeds model.max_position {m.max_position}")
        if resolve_dataset(d.dataset).kind == "shards":
            raise NobleError(f"data.dataset {d.dataset!r} is a prepared GPT-2 shard folder; the masked-LM task "
                             "tokenizes raw text itself (embedded, an HF dataset, or .txt/.jsonl/.parquet files)")
        if d.vocab is not None:
            from noble_cli.data.wordpiece import load_vocab

            size = load_vocab(d.vocab, d.lowercase).vocab_size
            if size > m.vocab_size:
                raise NobleError(f"data.vocab has {size} tokens, more than model.vocab_size {m.vocab_size}")

    def build_module(self, cfg: RunConfig) -> MaskedLM:
        return MaskedLM(cfg)

    def build_datamodule(self, cfg: RunConfig):
        from noble_cli.data.mlm import MLMDataModule

        m, d, t = cfg.model, cfg.data, cfg.trainer
        return MLMDataModule(
            data=d.dataset, seq_len=d.seq_len, batch_size=t.batch_size, seed=cfg.seed, eval_batches=t.eval_batches,
            num_workers=t.num_workers, vocab_size=m.vocab_size, vocab=d.vocab, lowercase=d.lowercase,
            tokenizer_every=d.tokenizer_every, limit=d.limit, mlm_probability=d.mlm_probability,
            mask_ratio=d.mask_ratio, random_ratio=d.random_ratio, eval_seed=d.eval_seed, cache_dir=d.cache_dir,
            max_steps=t.micro_batches,
        )

    def synthetic_batch(self, module: MaskedLM, batch_size: int, generator: torch.Generator):
        seq, d = module.data_cfg.seq_len, module.data_cfg
        ids = torch.randint(0, module.model_cfg.vocab_size, (batch_size, seq), generator=generator)
        chosen = torch.rand(batch_size, seq, generator=generator) < d.mlm_probability
        chosen[:, 0] = True  # at least one chosen token per sequence
        return {"input_ids": ids, "labels": torch.where(chosen, ids, -100)}, batch_size * seq

    def data_summary(self, cfg: RunConfig) -> str:
        m, d = cfg.model, cfg.data
        case = "uncased" if d.lowercase else "cased"
        if d.vocab:
            vocab = f"WordPiece {d.vocab}"
        else:
            sample = "" if d.tokenizer_every == 1 else f", vocab from every {d.tokenizer_every}th doc"
            vocab = f"WordPiece {m.vocab_size} {case}{sample}"
        limit = f", {d.limit} docs/source" if d.limit else ""
        return f"{d.dataset} ({vocab}{limit}; seq {d.seq_len}, {d.mlm_probability:.0%} masked)"


TASK = MaskedLMTask()

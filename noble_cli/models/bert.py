"""A BERT encoder with its masked-LM head, small enough to read in one sitting.

Plain nn.Linear everywhere: NOBLE branches are added afterwards by `noble_cli.layers.apply_noble`, which finds the
attention projections (`layers.N.attn.{q,k,v,o}`) and the feed-forward layers (`layers.N.mlp.{fc,fc2}`) by name.
The embeddings (`embed.*`) and the MLM head (`head.transform`, `head.decoder`) match neither name and are never
augmented, as in the paper.

Layer norm placement, `norm: pre | post` (default pre):
- `post` is the original BERT: x = LN(x + attn(x)); x = LN(x + mlp(x)). Faithful, but the gradients at the lower
  layers are small at init and post-LN needs a long learning-rate warm-up (BERT: 10k steps) to train stably.
- `pre` (x = x + attn(LN(x)); x = x + mlp(LN(x)); a final LN before the head) trains stably with a short warm-up and
  a higher learning rate, which suits short ablations (Xiong et al. 2020, "On Layer Normalization in the Transformer
  Architecture"). Both keep BERT's LN after the embeddings.

Other choices: BERT's GELU (erf), biases, LN eps 1e-12, N(0, 0.02) init and an MLM head of dense -> GELU -> LN ->
decoder tied to the token embedding, with its own output bias. No segment (token-type) embeddings: there is no
next-sentence objective. Weight decay as in BERT: every matrix, embeddings included (no `no_weight_decay` list),
none on biases and norms. Attention is F.scaled_dot_product_attention, bidirectional; an optional (B, T) attention
mask (True = a real token) masks padded keys, though the masked-LM data packs sequences and never pads.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from noble_cli.config import Float, Int
from noble_cli.errors import NobleError
from noble_cli.models.transformer import (
    MLP,
    SelfAttention,
    TransformerConfig,
    padded_vocab,
    run_blocks,
)


class BertConfig(TransformerConfig):
    """A BERT encoder (a recipe's `model:` section for the masked-LM task)."""

    vocab_size: Int = Field(30522, gt=5, le=1 << 16)
    """At most 65,536: token ids are stored as uint16."""
    max_position: Int = Field(512, ge=3)
    n_layer: Int = Field(12, ge=1)
    n_head: Int = Field(12, ge=1)
    d_model: Int = Field(768, ge=1)
    mlp_ratio: Float = Field(4.0, gt=0)
    dropout: Float = Field(0.1, ge=0, lt=1)
    """BERT's, on embeddings, attention probabilities and residual branches."""
    norm: Literal["pre", "post"] = "pre"
    """pre | post (see the module docstring)."""
    bias: bool = True
    layer_norm_eps: Float = Field(1e-12, gt=0)
    pad_vocab_to: Int = Field(64, ge=1)
    """Round the embedding up to a multiple of this (tensor-core friendly); 1 disables."""

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.vocab_size, self.pad_vocab_to)


class Block(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.pre = cfg.norm == "pre"
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.bias, cfg.bias, cfg.dropout)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.mlp_hidden, cfg.bias)  # dropout is applied by the block
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre:
            x = x + self.drop(self.attn(self.ln1(x), attn_mask))
            return x + self.drop(self.mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, attn_mask)))
        return self.ln2(x + self.drop(self.mlp(x)))


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_position, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.norm(self.tok(idx) + self.pos(pos)))


class MLMHead(nn.Module):
    """dense -> GELU -> LN -> decoder (weight tied to the token embedding, own bias)."""

    def __init__(self, cfg: BertConfig, embedding: nn.Embedding):
        super().__init__()
        self.transform = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.decoder = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=True)
        self.decoder.weight = embedding.weight  # tied
        self.vocab_size = cfg.vocab_size

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.transform(h))))[..., : self.vocab_size]


class BERT(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embeddings(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.norm == "pre" else nn.Identity()
        self.head = MLMHead(cfg, self.embed.tok)
        self.activation_checkpointing = False
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def encode(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> final hidden states (B, T, d_model). attention_mask: (B, T), True = a real token."""
        if idx.shape[1] > self.cfg.max_position:
            raise NobleError(f"sequence of {idx.shape[1]} tokens exceeds model.max_position {self.cfg.max_position}")
        attn_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        x = self.embed(idx)
        x = run_blocks(self.layers, x, attn_mask, checkpointing=self.activation_checkpointing and self.training)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Without labels: logits (B, T, vocab_size). With labels (B, T; -100 = not predicted): the logits at the
        labelled positions only, (N, vocab_size), and their targets (N,) — the head then runs on ~15% of the tokens,
        which at vocab 30,522 saves about a fifth of BERT-base's compute."""
        h = self.encode(idx, attention_mask)
        if labels is None:
            return self.head(h)
        chosen = labels != -100
        return self.head(h[chosen]), labels[chosen]

    def flops_per_token(self, seq_len: int, predicted_fraction: float = 0.15) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 * encoder matmul params + attention scores,
        plus the head on the predicted fraction of the tokens."""
        # NobleLinear is an nn.Linear (its main weight) and its branch's down/up/mix are nn.Linear children.
        encoder = sum(m.weight.numel() for m in self.layers.modules() if isinstance(m, nn.Linear))
        head = self.head.transform.weight.numel() + self.cfg.vocab_size * self.cfg.d_model
        attention = 4 * self.cfg.n_layer * seq_len * self.cfg.d_model  # QK^T and AV per token, forward
        return 6 * encoder + 3 * attention + 6 * predicted_fraction * head

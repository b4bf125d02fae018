"""A GPT-2-style decoder, small enough to read in one sitting.

Plain nn.Linear everywhere: NOBLE branches are added afterwards by `noble_cli.layers.apply_noble`, which finds the
attention projections (`blocks.N.attn.{q,k,v,o}`) and the MLP (`blocks.N.mlp.{fc,fc2}`) by name. The token
embedding and the tied LM head are never augmented. The same module serves the autoregressive image-token task
(a different vocabulary, no other change).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from noble_cli.config import Float, Int
from noble_cli.models.transformer import (
    MLP,
    SelfAttention,
    TransformerConfig,
    lm_flops_per_token,
    padded_vocab,
    run_blocks,
)


class GPTConfig(TransformerConfig):
    """A GPT-2-style decoder (a recipe's `model:` section for the causal-LM and image-token tasks)."""

    vocab_size: Int = Field(50257, ge=2)
    block_size: Int = Field(1024, ge=1)
    """The longest context (learned positions)."""
    n_layer: Int = Field(12, ge=1)
    n_head: Int = Field(12, ge=1)
    d_model: Int = Field(768, ge=1)
    mlp_ratio: Float = Field(4.0, gt=0)
    """MLP hidden width / d_model."""
    dropout: Float = Field(0.0, ge=0, lt=1)
    bias: bool = False
    """Biases in the linears and LayerNorms."""
    pad_vocab_to: Int = Field(64, ge=1)
    """Round the embedding up to a multiple of this (tensor-core friendly); 1 disables."""

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.vocab_size, self.pad_vocab_to)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.bias, cfg.bias, cfg.dropout, causal=True)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg.d_model, cfg.mlp_hidden, cfg.bias, cfg.dropout, gelu="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.o.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size)."""
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        x = run_blocks(self.blocks, x, checkpointing=self.activation_checkpointing and self.training)
        logits = self.lm_head(self.ln_f(x))
        return logits[..., : self.cfg.vocab_size]

    def flops_per_token(self, seq_len: int) -> float:
        return lm_flops_per_token(self, self.cfg.n_layer, self.cfg.d_model, seq_len)

"""The pieces every transformer here shares: self-attention, the MLP, and a causal LM's FLOPs per token.

Q, K, V and the output projection are separate nn.Linear layers (`q`, `k`, `v`, `o`), and the MLP's are `fc` and
`fc2`, so that `apply_noble` can give each its own branch and find them by name (`...attn.q`, `...mlp.fc2`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from noble_cli.config import ConfigModel
from noble_cli.layers.targets import linear_kind


class TransformerConfig(ConfigModel):
    """What the built-in transformers' configs (GPT, BERT, ViT, the VQGAN) share: the MLP's hidden width as
    `mlp_ratio` x `d_model`, which the dense-matched control widens (`with_mlp_hidden`, the `WidensMLP` contract in
    tasks/base.py), and the check that the heads divide the width. Each subclass declares the fields itself, with its
    own defaults and docs, so that field order (and with it every run id) stays as it was."""

    if TYPE_CHECKING:
        d_model: int
        n_head: int
        mlp_ratio: float

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_head:
            raise ValueError(f"model.d_model {self.d_model} must be divisible by model.n_head {self.n_head}")
        return self

    @property
    def mlp_hidden(self) -> int:
        return int(round(self.mlp_ratio * self.d_model))

    def with_mlp_hidden(self, width: int):
        """This config with the MLP `width` wide (mlp_ratio = width / d_model)."""
        return self.model_copy(update={"mlp_ratio": width / self.d_model})


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """The embedding's row count: the vocabulary rounded up to `multiple` (tensor-core friendly; 1 disables)."""
    m = max(1, multiple)
    return (vocab_size + m - 1) // m * m


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, *args, checkpointing: bool = False) -> torch.Tensor:
    """x through each block in turn (block(x, *args)); with `checkpointing`, each block's activations are recomputed
    in the backward pass instead of kept (the models' `activation_checkpointing`, set from the trainer config)."""
    for block in blocks:
        x = checkpoint(block, x, *args, use_reentrant=False) if checkpointing else block(x, *args)
    return x


class SelfAttention(nn.Module):
    """Multi-head self-attention on PyTorch's fused scaled_dot_product_attention (causal or with a mask)."""

    def __init__(self, d_model: int, n_head: int, qkv_bias: bool = True, out_bias: bool = True,
                 dropout: float = 0.0, causal: bool = False):
        super().__init__()
        assert d_model % n_head == 0, "d_model must be divisible by n_head"
        self.q = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.k = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.v = nn.Linear(d_model, d_model, bias=qkv_bias)
        self.o = nn.Linear(d_model, d_model, bias=out_bias)
        self.n_head, self.dropout, self.causal = n_head, dropout, causal

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal and attn_mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """fc -> GELU -> fc2, with dropout on the hidden and the output activations."""

    def __init__(self, d_model: int, hidden: int, bias: bool = True, dropout: float = 0.0, gelu: str = "none"):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.gelu = gelu  # "tanh" is GPT-2's approximation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc(x), approximate=self.gelu))))


def lm_flops_per_token(model: nn.Module, n_layer: int, width: int, seq_len: int) -> float:
    """A causal LM's training FLOPs per token (forward + backward = 3x forward): 6 x the weights of every linear
    layer (nn.Linear and GPT-2's Conv1D; a NOBLE layer's main weight and its branch's down/up/mix, the LM head) +
    the attention scores, QK^T and AV at the model's width (no causal discount, as in PaLM and nanoGPT)."""
    matmul_params = sum(m.weight.numel() for m in model.modules() if linear_kind(m))
    attention = 4 * n_layer * seq_len * width
    return 6 * matmul_params + 3 * attention

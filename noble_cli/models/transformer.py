"""The pieces every transformer here shares: self-attention, the MLP, and a causal LM's FLOPs per token.

Q, K, V and the output projection are separate nn.Linear layers (`q`, `k`, `v`, `o`), and the MLP's are `fc` and
`fc2`, so that `apply_noble` can give each its own branch and find them by name (`...attn.q`, `...mlp.fc2`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from noble_cli.layers.targets import linear_kind


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """The embedding's row count: the vocabulary rounded up to `multiple` (tensor-core friendly; 1 disables)."""
    m = max(1, multiple)
    return (vocab_size + m - 1) // m * m


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

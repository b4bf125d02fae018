"""A Vision Transformer (ViT / DeiT), and the bidirectional transformer blocks the VQGAN reuses.

Plain nn.Linear everywhere: NOBLE branches are added afterwards by `noble_cli.layers.apply_noble`, which finds the
attention projections (`blocks.N.attn.{q,k,v,o}`) and the MLP (`blocks.N.mlp.{fc,fc2}`) by name. The patch
embedding (a strided conv), the class token, the position embedding and the classifier `head` are never augmented.
Stochastic depth is torchvision's `StochasticDepth` (row mode), its rate rising linearly with depth up to
`drop_path`, as in DeiT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torchvision.ops import StochasticDepth

from noble_cli.config import Float, Int
from noble_cli.models.transformer import MLP, SelfAttention, TransformerConfig, run_blocks


class PatchTransformerConfig(TransformerConfig):
    """What a patch transformer (ViT, the VQGAN) adds: an image cut into a grid of patch_size squares. Subclasses
    declare image_size and patch_size."""

    if TYPE_CHECKING:
        image_size: int
        patch_size: int

    @model_validator(mode="after")
    def _patches_tile_the_image(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"model.image_size {self.image_size} must be a multiple of model.patch_size "
                             f"{self.patch_size}")
        return self

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


class ViTConfig(PatchTransformerConfig):
    """A ViT / DeiT classifier (a recipe's `model:` section for the vit task)."""

    image_size: Int = Field(224, ge=1)
    patch_size: Int = Field(16, ge=1)
    in_channels: Int = Field(3, ge=1)
    num_classes: Int = Field(1000, ge=2)
    d_model: Int = Field(384, ge=1)
    n_layer: Int = Field(12, ge=1)
    n_head: Int = Field(6, ge=1)
    mlp_ratio: Float = Field(4.0, gt=0)
    drop_path: Float = Field(0.1, ge=0, lt=1)
    """Stochastic depth rate of the last block (rising linearly from 0 at the first)."""
    dropout: Float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    pool: Literal["cls", "mean"] = "cls"
    """cls: the class token; mean: the average of the patch tokens."""

    @property
    def num_patches(self) -> int:
        return self.grid**2


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(LN x)), then x + DropPath(mlp(LN x))."""

    def __init__(self, d_model: int, n_head: int, mlp_hidden: int, qkv_bias: bool = True, dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=1e-6)
        self.attn = SelfAttention(d_model, n_head, qkv_bias, out_bias=True, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model, eps=1e-6)
        self.mlp = MLP(d_model, mlp_hidden, bias=True, dropout=dropout)
        self.drop_path = StochasticDepth(drop_path, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.ln1(x)))
        return x + self.drop_path(self.mlp(self.ln2(x)))


def init_transformer_weights(m: nn.Module) -> None:
    """timm's ViT init: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def transformer_flops_per_item(blocks: nn.Module, tokens: int, d_model: int, n_layer: int) -> float:
    """Training FLOPs per item (image) of transformer blocks: 6 * linear params * tokens + attention scores.

    NobleLinear is an nn.Linear and its branch's down/up/mix are nn.Linear children, so branches are counted too.
    """
    matmul_params = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, nn.Linear))
    attention = 4 * n_layer * tokens * tokens * d_model  # QK^T and AV, forward
    return 6.0 * matmul_params * tokens + 3.0 * attention


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        n_tokens = cfg.num_patches + (1 if cfg.pool == "cls" else 0)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(1, cfg.n_layer - 1) for i in range(cfg.n_layer)]  # python: works on meta too
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_head, cfg.mlp_hidden, cfg.qkv_bias, cfg.dropout, r) for r in rates
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes)
        self.apply(init_transformer_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.activation_checkpointing = False

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.pos_embed, self.cls_token]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, d)
        if self.cfg.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = run_blocks(self.blocks, x, checkpointing=self.activation_checkpointing and self.training)
        x = self.norm(x)
        return x[:, 0] if self.cfg.pool == "cls" else x.mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(x))

    def flops_per_image(self) -> float:
        c = self.cfg
        tokens = c.num_patches + (1 if c.pool == "cls" else 0)
        edges = 6.0 * (self.patch_embed.weight.numel() * c.num_patches + self.head.weight.numel())
        return transformer_flops_per_item(self.blocks, tokens, c.d_model, c.n_layer) + edges

"""A transformer VQGAN (ViT-VQGAN style): ViT encoder -> vector quantizer -> ViT decoder, and a patch discriminator.

    image (B, C, H, W) in [-1, 1]
      -> encoder: patch conv, position embedding, `encoder.blocks.N.{attn,mlp}`, LayerNorm, `to_code` (d -> code dim)
      -> quantizer: nearest codebook entry (optionally l2-normalized, "factorized codes"), straight-through gradient
      -> decoder: `from_code` (code dim -> d), position embedding, `decoder.blocks.N.{attn,mlp}`, LayerNorm,
         `to_pixels` (d -> patch pixels), unpatchify

NOBLE branches go on the encoder's and decoder's attention and MLP linears only (found by name); the patch
projections, `to_code`/`from_code`, the codebook and the discriminator (a small conv net) stay plain.

The quantizer follows VQ-VAE: codebook loss ||sg[z] - e||^2 moves the codebook, commitment loss ||z - sg[e]||^2
(weighted by beta) moves the encoder, and z + sg[e - z] passes the decoder's gradient straight to the encoder.
It counts code hits between restarts and keeps a ring buffer of recent encoder outputs: codes no encoder output chose
since the last check are re-seeded from that buffer (`restart_dead_codes`, called by the task every N steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from noble_cli.config import Float, Int
from noble_cli.models.transformer import run_blocks
from noble_cli.models.vit import (
    Block,
    PatchTransformerConfig,
    init_transformer_weights,
    transformer_flops_per_item,
)

MAX_CODEBOOK = 65535  # codes + a BOS token must fit the uint16 token files of the image-token LM


class VQGANConfig(PatchTransformerConfig):
    """A transformer VQGAN (a recipe's `model:` section for the vqgan task; the losses are here too, so that the
    section describes the whole VQGAN)."""

    image_size: Int = Field(256, ge=1)
    patch_size: Int = Field(8, ge=1)
    in_channels: Int = Field(3, ge=1)
    d_model: Int = Field(512, ge=1)
    n_layer: Int = Field(8, ge=1)
    """Encoder blocks."""
    n_layer_decoder: Int | None = Field(None, ge=1)
    """Decoder blocks (default: n_layer)."""
    n_head: Int = Field(8, ge=1)
    mlp_ratio: Float = Field(4.0, gt=0)
    dropout: Float = Field(0.0, ge=0, lt=1)
    qkv_bias: bool = True
    codebook_size: Int = Field(8192, ge=2, le=MAX_CODEBOOK)
    """Codes in the codebook; with a BOS token they must fit the image-token LM's uint16 token files."""
    codebook_dim: Int = Field(32, ge=1)
    """Factorized codes: the look-up happens in this low-dim space."""
    l2_normalize: bool = True
    """Cosine-similarity look-up (ViT-VQGAN)."""
    beta: Float = Field(0.25, ge=0)
    """Commitment weight."""
    restart_every: Int = Field(200, ge=0)
    """Steps between dead-code restarts; 0 = never."""
    recent_size: Int = Field(8192, ge=1)
    """Encoder outputs kept for restarts."""
    recon_loss: Literal["l2", "l1"] = "l2"
    disc_weight: Float = Field(0.1, ge=0)
    """Adversarial weight for the generator; 0 = no discriminator."""
    disc_adaptive: bool = True
    """VQGAN's adaptive weight: scale the adversarial gradient at the decoder's last layer to disc_weight x the
    reconstruction gradient there."""
    disc_start: Int = Field(0, ge=0)
    """Step at which the discriminator and the adversarial term start."""
    disc_channels: Int = Field(64, ge=1)
    disc_layers: Int = Field(3, ge=1)
    """Strided conv layers of the patch discriminator."""
    disc_lr: Float | None = Field(None, gt=0)
    """Default: optim.lr."""

    @property
    def num_codes(self) -> int:
        """Codes per image."""
        return self.grid**2

    @property
    def decoder_layers(self) -> int:
        return self.n_layer if self.n_layer_decoder is None else self.n_layer_decoder


@dataclass
class Quantized:
    z_q: torch.Tensor  # straight-through quantized vectors, shape of the input
    codes: torch.Tensor  # long, input shape without the last dim
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor  # exp(entropy) of the code histogram of this batch
    usage: torch.Tensor  # fraction of the codebook used in this batch


def code_perplexity(codes: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(codes.reshape(-1), minlength=codebook_size).float()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
    return perplexity, (counts > 0).float().mean()


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, l2_normalize: bool = False, recent_size: int = 8192):
        super().__init__()
        self.codebook_size, self.dim, self.l2_normalize = codebook_size, dim, l2_normalize
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        if l2_normalize:
            nn.init.normal_(self.codebook.weight)
        self.register_buffer("hits", torch.zeros(codebook_size), persistent=True)  # since the last restart check
        self.register_buffer("recent", torch.zeros(recent_size, dim), persistent=True)
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("recent_pos", torch.zeros((), dtype=torch.long), persistent=True)

    def embeddings(self) -> torch.Tensor:
        w = self.codebook.weight
        return F.normalize(w, dim=-1) if self.l2_normalize else w

    @torch.no_grad()
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code index of every vector of z (..., dim): argmin ||z - e||^2 in fp32."""
        with torch.autocast(z.device.type, enabled=False):  # bf16 distances would pick wrong codes
            flat = z.reshape(-1, self.dim).float()
            e = self.embeddings().float()
            dist = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
            return dist.argmin(dim=1).view(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embeddings())

    def forward(self, z: torch.Tensor) -> Quantized:
        codes = self.nearest(z)
        e = self.lookup(codes).to(z.dtype)
        codebook_loss = F.mse_loss(e.float(), z.detach().float())  # gradient to the codebook only
        commitment_loss = F.mse_loss(z.float(), e.detach().float())  # gradient to the encoder only
        z_q = z + (e - z).detach()  # straight-through: d z_q / d z = identity
        perplexity, usage = code_perplexity(codes, self.codebook_size)
        if self.training:
            self._remember(z.detach(), codes)
        return Quantized(z_q, codes, codebook_loss, commitment_loss, perplexity, usage)

    @torch.no_grad()
    def _remember(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        self.hits += torch.bincount(codes.reshape(-1), minlength=self.codebook_size).to(self.hits.dtype)
        flat = z.reshape(-1, self.dim).to(self.recent.dtype)
        size = self.recent.shape[0]
        take = min(flat.shape[0], max(1, size // 8))  # a random sample per step, so the buffer spans many steps
        sample = flat[torch.randperm(flat.shape[0], device=flat.device)[:take]]
        idx = (self.recent_pos + torch.arange(take, device=flat.device)) % size
        self.recent[idx] = sample
        self.recent_pos.copy_((self.recent_pos + take) % size)
        self.recent_filled.copy_(torch.clamp(self.recent_filled + take, max=size))

    @torch.no_grad()
    def restart_dead_codes(self) -> int:
        """Re-seed every code not chosen since the last call with a random recent encoder output; returns how many.

        Under DDP every rank's codebook is made rank 0's afterwards (the buffers differ between ranks).
        """
        n_recent = int(self.recent_filled)
        dead = self.hits == 0
        n_dead = int(dead.sum())
        if n_dead and n_recent:
            pick = torch.randint(0, n_recent, (n_dead,), device=self.recent.device)
            self.codebook.weight[dead] = self.recent[pick].to(self.codebook.weight.dtype)
        self.hits.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(self.codebook.weight.data, src=0)
        return n_dead if n_recent else 0


def unpatchify(x: torch.Tensor, p: int, channels: int, grid: int) -> torch.Tensor:
    """(B, grid*grid, p*p*C) -> (B, C, grid*p, grid*p)."""
    B = x.shape[0]
    x = x.reshape(B, grid, grid, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, grid * p, grid * p)


class Encoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_codes, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_head, cfg.mlp_hidden, cfg.qkv_bias, cfg.dropout) for _ in range(cfg.n_layer)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.to_code = nn.Linear(d, cfg.codebook_dim)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        h = run_blocks(self.blocks, h, checkpointing=self.activation_checkpointing and self.training)
        return self.to_code(self.norm(h))


class Decoder(nn.Module):
    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        self.from_code = nn.Linear(cfg.codebook_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_codes, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.n_head, cfg.mlp_hidden, cfg.qkv_bias, cfg.dropout) for _ in range(cfg.decoder_layers)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.to_pixels = nn.Linear(d, cfg.patch_size**2 * cfg.in_channels)
        self.activation_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_code(z) + self.pos_embed
        h = run_blocks(self.blocks, h, checkpointing=self.activation_checkpointing and self.training)
        c = self.cfg
        return unpatchify(self.to_pixels(self.norm(h)), c.patch_size, c.in_channels, c.grid)


class VQGAN(nn.Module):
    """The generator: encode -> quantize -> decode. Images in [-1, 1]."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.l2_normalize, cfg.recent_size)
        self.decoder = Decoder(cfg)
        self.encoder.apply(init_transformer_weights)
        self.decoder.apply(init_transformer_weights)
        for pos in (self.encoder.pos_embed, self.decoder.pos_embed):
            nn.init.trunc_normal_(pos, std=0.02)

    @property
    def activation_checkpointing(self) -> bool:
        return self.encoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = on

    def no_weight_decay(self) -> list[nn.Parameter]:
        return [self.encoder.pos_embed, self.decoder.pos_embed, self.quantizer.codebook.weight]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> continuous code vectors (B, N, codebook_dim), l2-normalized if the codebook is."""
        z = self.encoder(x)
        return F.normalize(z, dim=-1) if self.cfg.l2_normalize else z

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantizer(self.encode(x))
        return self.decoder(q.z_q), q

    @torch.no_grad()
    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> code indices (B, N), row-major over the patch grid."""
        return self.quantizer.nearest(self.encode(x))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (B, N) -> images (B, C, H, W) in about [-1, 1]."""
        return self.decoder(self.quantizer.lookup(codes.long()))

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight, where VQGAN balances the reconstruction and adversarial gradients."""
        return self.decoder.to_pixels.weight

    def flops_per_image(self) -> float:
        c = self.cfg
        return (transformer_flops_per_item(self.encoder.blocks, c.num_codes, c.d_model, c.n_layer)
                + transformer_flops_per_item(self.decoder.blocks, c.num_codes, c.d_model, c.decoder_layers)
                + 6.0 * c.num_codes * (self.encoder.patch_embed.weight.numel() + self.encoder.to_code.weight.numel()
                                       + self.decoder.from_code.weight.numel() + self.decoder.to_pixels.weight.numel()
                                       + c.codebook_size * c.codebook_dim / 3))


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: strided 4x4 convs, LeakyReLU(0.2), GroupNorm; one logit per patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, n_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(_groups(out), out),
                       nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _groups(channels: int) -> int:
    return math.gcd(channels, 32)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean over images of 10 log10(range^2 / MSE) (dB); x, y (B, ...) on the same scale."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))).mean()

"""Autoregressive modelling of VQGAN image tokens (recipes image-lm-tiny, image-lm-imagenet).

The causal-LM task unchanged (`CausalLM`, the GPT of `noble_cli.models.gpt`), over a different vocabulary and data:
a trained VQGAN checkpoint encodes the data set into code indices once (cached as LM shards, see
`noble_cli.data.image_tokens`), and every image is one sequence BOS, c_0, ..., c_{n-1}. So model.vocab_size =
codebook_size + 1 (the BOS token) and model.block_size >= n = codes per image; both are checked against the
checkpoint before training. eval_loss is the cross-entropy per code (nats).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from noble_cli.config import RunConfig
from noble_cli.errors import NobleError
from noble_cli.models.gpt import GPTConfig
from noble_cli.models.vqgan import VQGANConfig
from noble_cli.tasks.causal_lm import CausalLM

ModelConfig = GPTConfig


@dataclass
class DataConfig:
    vqgan_checkpoint: str = "recipe:vqgan-tiny"  # a .ckpt, a VQGAN run folder, or recipe:NAME (its default run)
    dataset: str | None = None  # default: the data set the VQGAN was trained on
    root: str | None = None
    cache_dir: str | None = None  # default: $NOBLE_DATA_DIR/image-tokens-<dataset>-<hash>
    limit: int | None = None  # encode at most this many images per split (quick runs)
    encode_batch_size: int = 256


def check(cfg: RunConfig) -> None:
    from noble_cli.tasks.causal_lm import check_gpt_shape

    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    check_gpt_shape(m)
    if not str(d.vqgan_checkpoint).strip():
        raise NobleError("data.vqgan_checkpoint is empty; give a VQGAN run folder, a .ckpt file or recipe:NAME")
    if d.limit is not None and d.limit < 1:
        raise NobleError(f"data.limit must be >= 1, got {d.limit}")


def check_against_checkpoint(cfg: RunConfig) -> dict:
    """Vocabulary and sequence length the checkpoint implies, checked against the model; returns them."""
    from noble_cli.data.image_tokens import checkpoint_config, resolve_checkpoint

    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    vq = VQGANConfig(**checkpoint_config(resolve_checkpoint(d.vqgan_checkpoint)).model)
    vocab, seq = vq.codebook_size + 1, vq.num_codes
    if m.vocab_size != vocab:
        raise NobleError(f"model.vocab_size is {m.vocab_size} but the VQGAN's codebook has {vq.codebook_size} codes: "
                         f"set --set model.vocab_size={vocab} (codes + BOS)")
    if m.block_size < seq:
        raise NobleError(f"model.block_size {m.block_size} is shorter than the {seq} codes per image: "
                         f"set --set model.block_size={seq}")
    return {"vocab_size": vocab, "seq_len": seq}


class ImageLM(CausalLM):
    """CausalLM over image codes; only the data differs."""

    items_name = "tokens"

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (for FLOPs): the codes per image when the checkpoint is at hand, else block_size
        (the recipes set it to the codes per image; `noble bench` runs without a checkpoint)."""
        return self._codes_per_image or self.model.cfg.block_size

    @functools.cached_property
    def _codes_per_image(self) -> int | None:  # reads the checkpoint: once
        try:
            return check_against_checkpoint(self.cfg)["seq_len"]
        except NobleError:
            return None

    def data_identity(self) -> dict:
        """Which VQGAN made the codes: runs on different codebooks must not pair (or resume into each other)."""
        from noble_cli.data.image_tokens import checkpoint_fingerprint, resolve_checkpoint

        return {"vqgan_checkpoint": checkpoint_fingerprint(resolve_checkpoint(self.data_cfg.vqgan_checkpoint))}


def build_module(cfg: RunConfig) -> ImageLM:
    return ImageLM(cfg, ModelConfig(**cfg.model), DataConfig(**cfg.data))


def build_datamodule(cfg: RunConfig):
    from noble_cli.data.image_tokens import ImageTokenDataModule

    d = DataConfig(**cfg.data)
    check_against_checkpoint(cfg)
    return ImageTokenDataModule(
        d.vqgan_checkpoint, batch_size=cfg.trainer.batch_size, eval_batches=cfg.trainer.eval_batches, seed=cfg.seed,
        dataset=d.dataset, root=d.root, limit=d.limit, cache_dir=d.cache_dir, encode_batch_size=d.encode_batch_size,
        num_workers=cfg.trainer.num_workers, max_batches=cfg.trainer.max_steps * cfg.trainer.accumulate,
    )


def data_summary(cfg: RunConfig) -> str:
    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    return f"codes of {d.vqgan_checkpoint} (vocab {m.vocab_size})"

"""Autoregressive modelling of VQGAN image tokens (recipes image-lm-tiny, image-lm-imagenet).

The causal-LM task unchanged (`CausalLM`, the GPT of `noble_cli.models.gpt`), over a different vocabulary and data:
a trained VQGAN checkpoint encodes the data set into code indices once (cached as LM shards, see
`noble_cli.data.image_tokens`), and every image is one sequence BOS, c_0, ..., c_{n-1}. So model.vocab_size =
codebook_size + 1 (the BOS token) and model.block_size >= n = codes per image; both are checked against the
checkpoint before training. eval_loss is the cross-entropy per code (nats).
"""

from __future__ import annotations

import functools

import torch
from pydantic import Field

from noble_cli.config import ConfigModel, Int, RunConfig, Str
from noble_cli.errors import NobleError
from noble_cli.models.gpt import GPTConfig
from noble_cli.tasks.causal_lm import CausalLM, random_tokens
from noble_cli.tasks.spec import Task


class ImageTokenData(ConfigModel):
    """Images encoded into code indices by a trained VQGAN (once, cached as LM shards)."""

    vqgan_checkpoint: Str = Field("recipe:vqgan-tiny", min_length=1)
    """A .ckpt file, a VQGAN run folder, or recipe:NAME (that recipe's default run)."""
    dataset: Str | None = None
    """Default: the data set the VQGAN was trained on."""
    root: Str | None = None
    cache_dir: Str | None = None
    """Default: $NOBLE_DATA_DIR/image-tokens-<dataset>-<hash>."""
    limit: Int | None = Field(None, ge=1)
    """Encode at most this many images per split (quick runs)."""
    encode_batch_size: Int = Field(256, ge=1)


def check_against_checkpoint(cfg: RunConfig) -> dict:
    """Vocabulary and sequence length the checkpoint implies, checked against the model; returns them."""
    from noble_cli.data.image_tokens import checkpoint_config, resolve_checkpoint

    m, d = cfg.model, cfg.data
    vq = checkpoint_config(resolve_checkpoint(d.vqgan_checkpoint)).model
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


class ImageLMTask(Task):
    name = "image_lm"
    model_class = GPTConfig
    data_class = ImageTokenData

    def build_module(self, cfg: RunConfig) -> ImageLM:
        return ImageLM(cfg)

    def build_datamodule(self, cfg: RunConfig):
        from noble_cli.data.image_tokens import ImageTokenDataModule

        d, t = cfg.data, cfg.trainer
        check_against_checkpoint(cfg)
        return ImageTokenDataModule(
            d.vqgan_checkpoint, batch_size=t.batch_size, eval_batches=t.eval_batches, seed=cfg.seed,
            dataset=d.dataset, root=d.root, limit=d.limit, cache_dir=d.cache_dir,
            encode_batch_size=d.encode_batch_size, num_workers=t.num_workers, max_batches=t.micro_batches,
        )

    def synthetic_batch(self, module: ImageLM, batch_size: int, generator: torch.Generator):
        return random_tokens(module.model_cfg.vocab_size, batch_size, module.seq_len, generator)

    def data_summary(self, cfg: RunConfig) -> str:
        return f"codes of {cfg.data.vqgan_checkpoint} (vocab {cfg.model.vocab_size})"


TASK = ImageLMTask()

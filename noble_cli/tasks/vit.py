"""ViT image classification (recipes vit-tiny on Fashion-MNIST, vit-s16 on ImageNet-1k), DeiT-style training.

Augmentations are torchvision v2 transforms: RandAugment and RandomErasing per image, Mixup/CutMix per batch in the
training collate function (`noble_cli.data.images.BatchMixer`). Training targets are probability vectors (mixed or
one-hot) and the loss is cross-entropy with label smoothing on top; eval uses the clean labels and reports loss,
top-1 and top-5 accuracy (metrics.csv: eval_loss, eval_top1, eval_top5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from noble_cli.config import RunConfig
from noble_cli.errors import NobleError
from noble_cli.models.vit import ViT, ViTConfig
from noble_cli.tasks.base import NobleTask

ModelConfig = ViTConfig


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist | cifar10 | cifar100 | imagenet | hf:NAME | path to an ImageFolder
    root: str | None = None  # where the data set lives (default: its standard place)
    mixup: bool = True
    cutmix: bool = True
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    randaugment: bool = True
    random_erasing: float = 0.25  # probability; 0 = off
    label_smoothing: float = 0.1
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    download: bool = True  # CIFAR only: download when missing (needs network)


def check(cfg: RunConfig) -> None:
    from noble_cli.data.images import resolve_image_dataset

    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    check_transformer_shape(m.image_size, m.patch_size, m.d_model, m.n_head)
    if m.pool not in ("cls", "mean"):
        raise NobleError(f"unknown model.pool {m.pool!r}; valid: cls, mean")
    if not 0.0 <= m.drop_path < 1.0:
        raise NobleError(f"model.drop_path must be in [0, 1), got {m.drop_path}")
    if not 0.0 <= d.random_erasing <= 1.0:
        raise NobleError(f"data.random_erasing is a probability in [0, 1] (0 = off), got {d.random_erasing}")
    if not 0.0 <= d.label_smoothing < 1.0:
        raise NobleError(f"data.label_smoothing must be in [0, 1), got {d.label_smoothing}")
    for on, name in ((d.mixup, "mixup_alpha"), (d.cutmix, "cutmix_alpha")):
        if on and getattr(d, name) <= 0:
            raise NobleError(f"data.{name} must be > 0, got {getattr(d, name)}")
    source = resolve_image_dataset(d.dataset, d.root)
    if source.num_classes is not None and source.num_classes != m.num_classes:
        raise NobleError(f"dataset {source.id} has {source.num_classes} classes but model.num_classes is "
                         f"{m.num_classes}")


def check_transformer_shape(image_size: int, patch_size: int, d_model: int, n_head: int) -> None:
    if patch_size < 1 or image_size % patch_size:
        raise NobleError(f"model.image_size {image_size} must be a multiple of model.patch_size {patch_size}")
    if d_model % n_head:
        raise NobleError(f"model.d_model {d_model} must be divisible by model.n_head {n_head}")


class ViTClassifier(NobleTask):
    items_name = "images"

    def make_model(self, model_cfg: ViTConfig) -> ViT:
        return ViT(model_cfg)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def loss(self, batch):
        """Cross-entropy against (mixed or one-hot) probability targets, label smoothing on top."""
        images, targets = batch
        logits = self.model(images).float()
        return F.cross_entropy(logits, targets, label_smoothing=self.data_cfg.label_smoothing), {}

    def evaluate(self, batch) -> dict[str, torch.Tensor]:
        images, labels = batch
        logits = self.model(images).float()
        k = min(5, logits.shape[-1])
        hits = logits.topk(k, dim=-1).indices == labels[:, None]
        return {"loss": F.cross_entropy(logits, labels), "top1": hits[:, 0].float().mean(),
                "top5": hits.any(dim=-1).float().mean()}

    def items_in(self, batch) -> int:
        return int(batch[0].shape[0])

    def flops_per_item(self) -> float:
        return self.model.flops_per_image()


def build_module(cfg: RunConfig) -> ViTClassifier:
    return ViTClassifier(cfg, ModelConfig(**cfg.model), DataConfig(**cfg.data))


def build_datamodule(cfg: RunConfig):
    from noble_cli.data.images import (
        BatchMixer,
        ImageDataModule,
        MixCollate,
        classification_transform,
        resolve_image_dataset,
    )

    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    source = resolve_image_dataset(d.dataset, d.root)

    def collate(num_classes: int) -> MixCollate:
        return MixCollate(BatchMixer(num_classes, d.mixup, d.cutmix, d.mixup_alpha, d.cutmix_alpha))

    return ImageDataModule(
        d.dataset, d.root, batch_size=cfg.trainer.batch_size, eval_batches=cfg.trainer.eval_batches, seed=cfg.seed,
        train_transform=classification_transform(source, m.image_size, m.in_channels, True, d.randaugment,
                                                 d.random_erasing, d.randaugment_ops, d.randaugment_magnitude),
        eval_transform=classification_transform(source, m.image_size, m.in_channels, False),
        num_workers=cfg.trainer.num_workers, train_collate=collate, download=d.download,
        expect_classes=m.num_classes, max_batches=cfg.trainer.max_steps * cfg.trainer.accumulate,
    )


def data_summary(cfg: RunConfig) -> str:
    m, d = ModelConfig(**cfg.model), DataConfig(**cfg.data)
    aug = [name for name, on in (("mixup", d.mixup), ("cutmix", d.cutmix), ("RA", d.randaugment),
                                 ("erase", d.random_erasing > 0)) if on]
    return f"{d.dataset} {m.image_size}px, {'+'.join(aug) or 'no aug'}"

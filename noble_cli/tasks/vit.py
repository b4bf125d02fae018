"""ViT image classification (recipes vit-tiny on Fashion-MNIST, vit-s16 on ImageNet-1k), DeiT-style training.

Augmentations are torchvision v2 transforms: RandAugment and RandomErasing per image, Mixup/CutMix per batch in the
training collate function (`noble_cli.data.images.BatchMixer`). Training targets are probability vectors (mixed or
one-hot) and the loss is cross-entropy with label smoothing on top; eval uses the clean labels and reports loss,
top-1 and top-5 accuracy (metrics.csv: eval_loss, eval_top1, eval_top5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from noble_cli.config import ConfigModel, Float, Int, RunConfig, Str
from noble_cli.errors import NobleError
from noble_cli.models.vit import ViT, ViTConfig
from noble_cli.tasks.base import NobleTask
from noble_cli.tasks.spec import Task


class ImageClassificationData(ConfigModel):
    """An image classification data set and the DeiT-style augmentations."""

    dataset: Str = "fashion-mnist"
    """fashion-mnist | cifar10 | cifar100 | imagenet | hf:NAME | a path to an ImageFolder."""
    root: Str | None = None
    """Where the data set lives (default: its standard place)."""
    mixup: bool = True
    cutmix: bool = True
    mixup_alpha: Float = Field(0.8, gt=0)
    cutmix_alpha: Float = Field(1.0, gt=0)
    randaugment: bool = True
    random_erasing: Float = Field(0.25, ge=0, le=1)
    """Probability per image; 0 = off."""
    label_smoothing: Float = Field(0.1, ge=0, lt=1)
    randaugment_ops: Int = Field(2, ge=1)
    randaugment_magnitude: Int = Field(9, ge=0)
    download: bool = True
    """CIFAR only: download when missing (needs network)."""


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


class ViTTask(Task):
    name = "vit"
    model_class = ViTConfig
    data_class = ImageClassificationData

    def check(self, cfg: RunConfig) -> None:
        from noble_cli.data.images import resolve_image_dataset

        source = resolve_image_dataset(cfg.data.dataset, cfg.data.root)
        if source.num_classes is not None and source.num_classes != cfg.model.num_classes:
            raise NobleError(f"dataset {source.id} has {source.num_classes} classes but model.num_classes is "
                             f"{cfg.model.num_classes}")

    def build_module(self, cfg: RunConfig) -> ViTClassifier:
        return ViTClassifier(cfg)

    def build_datamodule(self, cfg: RunConfig):
        from noble_cli.data.images import (
            BatchMixer,
            ImageDataModule,
            MixCollate,
            classification_transform,
            resolve_image_dataset,
        )

        m, d = cfg.model, cfg.data
        source = resolve_image_dataset(d.dataset, d.root)

        def collate(num_classes: int) -> MixCollate:
            return MixCollate(BatchMixer(num_classes, d.mixup, d.cutmix, d.mixup_alpha, d.cutmix_alpha))

        return ImageDataModule(
            d.dataset, d.root, batch_size=cfg.trainer.batch_size, eval_batches=cfg.trainer.eval_batches,
            seed=cfg.seed,
            train_transform=classification_transform(source, m.image_size, m.in_channels, True, d.randaugment,
                                                     d.random_erasing, d.randaugment_ops, d.randaugment_magnitude),
            eval_transform=classification_transform(source, m.image_size, m.in_channels, False),
            num_workers=cfg.trainer.num_workers, train_collate=collate, download=d.download,
            expect_classes=m.num_classes, max_batches=cfg.trainer.micro_batches,
        )

    def synthetic_batch(self, module: ViTClassifier, batch_size: int, generator: torch.Generator):
        m = module.model_cfg
        images = torch.randn(batch_size, m.in_channels, m.image_size, m.image_size, generator=generator)
        return (images, torch.randint(0, m.num_classes, (batch_size,), generator=generator)), batch_size

    def data_summary(self, cfg: RunConfig) -> str:
        m, d = cfg.model, cfg.data
        aug = [name for name, on in (("mixup", d.mixup), ("cutmix", d.cutmix), ("RA", d.randaugment),
                                     ("erase", d.random_erasing > 0)) if on]
        return f"{d.dataset} {m.image_size}px, {'+'.join(aug) or 'no aug'}"


TASK = ViTTask()

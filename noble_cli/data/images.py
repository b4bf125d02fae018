"""Image data for the vision tasks (ViT, VQGAN, image-token LM): data sets, torchvision v2 transforms, Mixup/CutMix.

Data sets (`data.dataset`):
  * `fashion-mnist` (default, offline): the Debian package `dataset-fashion-mnist`, idx files read with numpy from
    /usr/share/datasets/fashion-mnist (or `data.root`). 60,000 train / 10,000 test, 28x28 grey, 10 classes.
  * `cifar10`, `cifar100`: torchvision's loaders, under `data.root` or $NOBLE_DATA_DIR/<name>; downloaded only when
    missing and `data.download` is true (needs network).
  * `imagenet`: ImageNet-1k through Hugging Face `datasets` (ILSVRC/imagenet-1k, gated: log in first), imported
    lazily; `hf:NAME` for any HF image-classification set (columns image/img and label/labels/fine_label).
  * a path: an ImageFolder tree (torchvision.datasets.ImageFolder). With `train/` and `val/` (or `validation/`,
    `test/`) subfolders these are the splits; otherwise one tree, split by a hash of each file's relative path
    (10% validation).

Every data set yields (image, label) with the image transformed by a torchvision v2 pipeline. Batch-level Mixup and
CutMix (`BatchMixer`) run in the training collate function, so they run in the loader workers; when both are on, one
of them is picked per batch (`v2.RandomChoice`, as DeiT does). Training targets are always class-probability
vectors (one-hot when mixing is off), so the loss treats both cases alike. Every random draw of the training data
(order, per-image transforms, Mixup/CutMix) is seeded by the run's seed and the sample's position, so a resumed run
sees exactly the batches of an uninterrupted one (`noble_cli/data/resumable.py`).

The evaluation set is a fixed random subset of the validation split (`eval_batches * batch_size` images, drawn with a
constant seed), the same for every run and seed, so that eval metrics of paired runs compare the same images.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from noble_cli.errors import NobleError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HF_NAMES = {"imagenet": "ILSVRC/imagenet-1k"}
EVAL_SEED = 1234  # the eval subset is the same for every run
FOLDER_VAL_FRACTION = 0.1

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
VALID_DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "hf:<name>", "a path to an ImageFolder tree")


@dataclass(frozen=True)
class ImageSource:
    """A resolved `data.dataset`: what it is and what is known about it before loading anything."""

    kind: str  # fashion-mnist | cifar10 | cifar100 | hf | folder
    id: str
    channels: int | None  # None: decided by the transform (RGB)
    num_classes: int | None  # None: known only once loaded
    native_size: int | None  # images' own size when fixed (28, 32); None for photos of any size
    root: Path | None = None
    hf_name: str | None = None

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return STATS.get(self.kind, IMAGENET_STATS)


def resolve_image_dataset(dataset: str, root: str | os.PathLike | None = None) -> ImageSource:
    name = str(dataset).strip()
    key = name.lower().replace("_", "-")
    if key in ("fashion-mnist", "fashionmnist", "embedded"):
        return ImageSource("fashion-mnist", "fashion-mnist", 1, 10, 28, Path(root) if root else FASHION_MNIST_DIR)
    if key in ("cifar10", "cifar-10", "cifar100", "cifar-100"):
        kind = "cifar100" if "100" in key else "cifar10"
        base = Path(root) if root else _data_root() / kind
        return ImageSource(kind, kind, 3, 100 if kind == "cifar100" else 10, 32, base)
    if key in HF_NAMES:
        return ImageSource("hf", f"hf:{HF_NAMES[key]}", 3, 1000, None, hf_name=HF_NAMES[key])
    if name.startswith("hf:") and len(name) > 3:
        return ImageSource("hf", name, 3, None, None, hf_name=name[3:])
    if os.sep in name or name.startswith((".", "~")) or Path(name).expanduser().is_dir():
        path = Path(name).expanduser()
        if not path.is_dir():
            raise NobleError(f"image folder {name!r} does not exist; valid datasets: {', '.join(VALID_DATASETS)}")
        return ImageSource("folder", f"folder:{path.resolve()}", 3, None, None, root=path.resolve())
    raise NobleError(f"unknown image dataset {dataset!r}; valid: {', '.join(VALID_DATASETS)}")


def _data_root() -> Path:
    from noble_cli.data.shards import data_root  # $NOBLE_DATA_DIR or ~/.cache/noble/data, as for text

    return data_root()


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: idx files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzipped or not) as a numpy array: magic 0x0000, a dtype byte, ndim, big-endian uint32 dims."""
    path = Path(path)
    raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise NobleError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    offset = 4 + 4 * ndim
    if len(raw) - offset < count * dtype.itemsize:
        raise NobleError(f"{path} is truncated: expected {count} values of shape {dims}")
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


@lru_cache(maxsize=4)
def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR,
                      split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of a split ('train' or 'val' = t10k)."""
    root = Path(root)
    stems = FASHION_MNIST_FILES[split]
    paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths):
        hint = ("install it with: apt-get install -y dataset-fashion-mnist" if root == FASHION_MNIST_DIR
                else f"expected {stems[0]}.gz and {stems[1]}.gz there")
        raise NobleError(f"Fashion-MNIST not found at {root}; {hint}")
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise NobleError(f"Fashion-MNIST files in {root} disagree: images {images.shape}, labels {labels.shape}")
    return images, labels


# ---------------------------------------------------------------------------------------------------------------
# datasets


class ArrayImages(Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) and int labels, transformed on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors

        img = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        img = img.unsqueeze(0) if img.ndim == 2 else img.permute(2, 0, 1)
        img = tv_tensors.Image(img)
        return (self.transform(img) if self.transform else img), int(self.labels[i])


class HFImages(Dataset):
    """A Hugging Face image-classification split (PIL images converted to RGB)."""

    def __init__(self, ds, transform: Callable | None = None):
        cols = ds.column_names
        self.image_col = next((c for c in ("image", "img", "jpg", "png") if c in cols), None)
        self.label_col = next((c for c in ("label", "labels", "fine_label", "cls") if c in cols), None)
        if self.image_col is None or self.label_col is None:
            raise NobleError(f"HF dataset has no image/label columns (columns: {', '.join(cols)})")
        self.ds, self.transform = ds, transform
        feature = ds.features[self.label_col]
        self.num_classes = getattr(feature, "num_classes", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        row = self.ds[int(i)]
        img = row[self.image_col].convert("RGB")
        return (self.transform(img) if self.transform else img), int(row[self.label_col])


class TransformedSubset(Dataset):
    """Items `indices` of a base dataset whose transform we set here (ImageFolder trees split by hash)."""

    def __init__(self, base, indices, transform: Callable | None):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        img, label = self.base[self.indices[i]]
        return (self.transform(img) if self.transform else img), label


def _hf_split(name: str, split: str):
    try:
        import datasets  # lazily: the GPU machine and `noble --help` must not need it
    except ImportError:
        raise NobleError(f"dataset hf:{name} needs the `datasets` package: pip install datasets") from None
    try:
        builder = datasets.load_dataset_builder(name)
        splits = list(builder.info.splits or {})
    except Exception as e:  # network, auth, unknown name: one line
        raise NobleError(f"cannot open HF dataset {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         " (ImageNet is gated: accept its terms and `huggingface-cli login`)") from None
    want = ["train"] if split == "train" else ["validation", "val", "test"]
    chosen = next((s for s in want if s in splits), None)
    if chosen is None:
        raise NobleError(f"HF dataset {name!r} has no {split} split (splits: {', '.join(splits)})")
    return datasets.load_dataset(name, split=chosen)


def _aligned_folder(sub: Path, train_dir: Path):
    """The val/ ImageFolder with train/'s class indices. Each ImageFolder numbers its own sorted class folders, so
    a val/ missing one class would silently shift every later label by one."""
    from torchvision.datasets import ImageFolder

    classes, class_to_idx = ImageFolder.find_classes(None, train_dir)
    extra = sorted(e.name for e in os.scandir(sub) if e.is_dir() and e.name not in class_to_idx)
    if extra:
        raise NobleError(f"{sub} has class folders that {train_dir} lacks: {', '.join(extra[:5])}")

    class TrainClasses(ImageFolder):
        def find_classes(self, directory):
            return classes, class_to_idx

    return TrainClasses(sub, allow_empty=True)


def _folder_split(root: Path, split: str):
    from torchvision.datasets import ImageFolder

    named = {"train": ["train"], "val": ["val", "validation", "test"]}[split]
    if (root / "train").is_dir():
        sub = next((root / n for n in named if (root / n).is_dir()), None)
        if sub is None:
            raise NobleError(f"image folder {root} has train/ but no val/, validation/ or test/ folder")
        if split == "train":
            return ImageFolder(sub), None
        return _aligned_folder(sub, root / "train"), None
    base = ImageFolder(root)
    keep = []
    for i, (path, _) in enumerate(base.samples):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        bucket = int(hashlib.blake2b(rel.encode(), digest_size=8).hexdigest(), 16) % 10_000
        if (bucket < FOLDER_VAL_FRACTION * 10_000) == (split == "val"):
            keep.append(i)
    if not keep:
        keep = list(range(len(base)))  # tiny trees: better the same images than none
    return base, keep


def load_split(source: ImageSource, split: str, transform: Callable | None = None,
               download: bool = True) -> tuple[Dataset, int]:
    """(dataset of (image, label), number of classes) for 'train' or 'val'."""
    if split not in ("train", "val"):
        raise NobleError(f"unknown split {split!r}; valid: train, val")
    if source.kind == "fashion-mnist":
        images, labels = load_fashion_mnist(str(source.root), split)
        return ArrayImages(images, labels, transform), 10
    if source.kind in ("cifar10", "cifar100"):
        from torchvision import datasets as tvd

        cls = tvd.CIFAR100 if source.kind == "cifar100" else tvd.CIFAR10
        try:
            ds = cls(str(source.root), train=split == "train", transform=transform, download=False)
        except RuntimeError:
            if not download:
                raise NobleError(f"{source.kind} not found in {source.root}; set data.download=true "
                                 "(needs network) or data.root to a folder holding it") from None
            try:
                ds = cls(str(source.root), train=split == "train", transform=transform, download=True)
            except Exception as e:
                raise NobleError(f"{source.kind} not found in {source.root} and the download failed "
                                 f"({type(e).__name__}: {e}); on an offline machine use the default fashion-mnist"
                                 ) from None
        return ds, len(ds.classes)
    if source.kind == "hf":
        ds = HFImages(_hf_split(source.hf_name, split), transform)
        n = ds.num_classes or source.num_classes
        if n is None:
            n = int(max(ds.ds[ds.label_col])) + 1
        return ds, n
    if source.kind == "folder":
        base, keep = _folder_split(source.root, split)
        if keep is None:
            base.transform = transform
            return base, len(base.classes)
        return TransformedSubset(base, keep, transform), len(base.classes)
    raise NobleError(f"unknown image dataset kind {source.kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# transforms (torchvision v2)


def _channels(source: ImageSource, in_channels: int) -> list:
    """Grey <-> RGB where the data set and the model disagree (nothing when they agree)."""
    from torchvision.transforms import v2

    if source.channels == in_channels:
        return []
    return [v2.Grayscale(num_output_channels=1) if in_channels == 1 else v2.RGB()]


def _stats(source: ImageSource, in_channels: int):
    mean, std = source.stats
    if len(mean) != in_channels:
        mean, std = (sum(mean) / len(mean),) * in_channels, (sum(std) / len(std),) * in_channels
    return list(mean), list(std)


def _resize_steps(source: ImageSource, image_size: int, train: bool, crop: bool = True) -> list:
    from torchvision.transforms import v2

    if source.native_size is not None:  # small fixed-size sets: resize if asked, pad-and-crop when training
        steps = [] if source.native_size == image_size else [v2.Resize(image_size, antialias=True)]
        if train and crop:
            steps.append(v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
        return steps
    if train and crop:
        return [v2.RandomResizedCrop(image_size, antialias=True)]
    if train:
        return [v2.Resize(image_size, antialias=True), v2.RandomCrop(image_size)]
    return [v2.Resize(int(round(image_size / 0.875)), antialias=True), v2.CenterCrop(image_size)]


def classification_transform(source: ImageSource, image_size: int, in_channels: int, train: bool,
                             randaugment: bool = False, random_erasing: float = 0.0, ra_ops: int = 2,
                             ra_magnitude: int = 9):
    """DeiT-style: (random-resized) crop, flip, RandAugment, normalize, random erasing — or the eval resize."""
    from torchvision.transforms import v2

    mean, std = _stats(source, in_channels)
    steps = [v2.ToImage(), *_channels(source, in_channels), *_resize_steps(source, image_size, train)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
        if randaugment:
            steps.append(v2.RandAugment(num_ops=ra_ops, magnitude=ra_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and random_erasing > 0:
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(steps)


def reconstruction_transform(source: ImageSource, image_size: int, in_channels: int, train: bool, flip: bool = True):
    """For the VQGAN and its tokens: images in [0, 1], crop/resize to size, horizontal flip when training."""
    from torchvision.transforms import v2

    steps = [v2.ToImage(), *_channels(source, in_channels), *_resize_steps(source, image_size, train, crop=False)]
    if train and flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


# ---------------------------------------------------------------------------------------------------------------
# Mixup / CutMix on the batch


class BatchMixer:
    """Mixup and/or CutMix on a batch (torchvision v2); targets become probability vectors over the classes.

    Both on: one of the two per batch, with equal probability (DeiT). Both off: images pass unchanged and labels
    become one-hot, so the training loss always sees the same kind of target.
    """

    def __init__(self, num_classes: int, mixup: bool = True, cutmix: bool = True, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0):
        from torchvision.transforms import v2

        self.num_classes = num_classes
        ops = []
        if mixup:
            ops.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
        if cutmix:
            ops.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
        self.op = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def enabled(self) -> bool:
        return self.op is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.op is None:
            return images, torch.nn.functional.one_hot(labels.long(), self.num_classes).float()
        images, targets = self.op(images, labels.long())
        return images, targets.float()


class MixCollate:
    """default_collate, then a BatchMixer (a class, not a closure, so that loader workers can pickle it)."""

    def __init__(self, mixer: BatchMixer):
        self.mixer = mixer

    def __call__(self, items):
        images, labels = default_collate(items)
        return self.mixer(images.as_subclass(torch.Tensor), labels)


def plain_collate(items):
    images, labels = default_collate(items)
    return images.as_subclass(torch.Tensor), labels


# ---------------------------------------------------------------------------------------------------------------
# the Lightning data module


class ImageDataModule(L.LightningDataModule):
    """Train loader (shuffled, every rank its own shard, optional batch collate) and a fixed eval subset.

    `train_collate(num_classes)` builds the training collate function once the class count is known.
    """

    def __init__(self, dataset: str, root: str | None, batch_size: int, eval_batches: int, seed: int,
                 train_transform: Callable, eval_transform: Callable, num_workers: int = 0,
                 train_collate: Callable[[int], Callable] | None = None, download: bool = True,
                 expect_classes: int | None = None, max_batches: int | None = None):
        super().__init__()
        self.max_batches = max_batches  # micro-batches in the run's budget (default: one pass over the data)
        self.source = resolve_image_dataset(dataset, root)
        self.batch_size, self.eval_batches, self.seed = batch_size, eval_batches, seed
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.num_workers, self.train_collate_factory, self.download = num_workers, train_collate, download
        self.expect_classes = expect_classes
        self.train_set = self.val_set = None
        self.num_classes: int | None = None

    def prepare_data(self) -> None:  # once per node: downloads happen here (CIFAR, HF)
        load_split(self.source, "train", None, self.download)
        load_split(self.source, "val", None, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.num_classes = load_split(self.source, "train", self.train_transform, self.download)
        val, _ = load_split(self.source, "val", self.eval_transform, self.download)
        if self.expect_classes is not None and self.num_classes != self.expect_classes:
            raise NobleError(f"dataset {self.source.id} has {self.num_classes} classes but model.num_classes is "
                             f"{self.expect_classes}; set --set model.num_classes={self.num_classes}")
        # The same images however many devices share them (each rank evaluates its slice), so runs on different
        # numbers of GPUs are scored on one set.
        n = min(len(val), self.eval_batches * self.batch_size)
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(EVAL_SEED))[:n]
        self.val_set = Subset(val, sorted(order.tolist()))

    def train_dataloader(self) -> DataLoader:
        """Shuffled passes over the data, each rank its share; order and augmentations resume exactly
        (data/resumable.py)."""
        from noble_cli.data.resumable import datamodule_train_loader

        self.setup()
        collate = self.train_collate_factory(self.num_classes) if self.train_collate_factory else plain_collate
        return datamodule_train_loader(self, self.train_set, collate)

    def val_dataloader(self) -> DataLoader:
        from noble_cli.data.resumable import datamodule_eval_loader

        self.setup()
        return datamodule_eval_loader(self, self.val_set, plain_collate)

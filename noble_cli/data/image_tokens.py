"""Image tokens: a data set encoded into VQGAN code indices, cached in the LM shard format, and their data module.

A token folder is an LM shard folder (`noble_cli.data.shards`: `train.bin`, `val.bin` of flat little-endian uint16
ids, `meta.json` written last), so `shards.load_tokens` reads it. Each image is one fixed-length record:

    [BOS, c_0, c_1, ..., c_{n-1}]      BOS = codebook_size, codes row-major over the VQGAN's patch grid

so the LM vocabulary is codebook_size + 1 and a training example is x = record[:-1], y = record[1:] (the model
predicts every code from BOS and the codes before it; seq len n). meta.json adds: kind, codebook_size, bos_id,
vocab_size, codes_per_image, grid, images per split, the checkpoint and the VQGAN's source data set.

Cache key: the checkpoint's resolved path, size and mtime, the data set and the image limit; folder
`$NOBLE_DATA_DIR/image-tokens-<dataset>-<hash>` unless `cache_dir` is given. A retrained checkpoint is re-encoded.

`data.vqgan_checkpoint` is a .ckpt file, a run folder (its checkpoints/best.ckpt, else last.ckpt), or
`recipe:NAME` = the run folder that `noble train NAME` (baseline, default seed, default --out results) writes.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, default_collate

from noble_cli.atomic import atomic_write_json, built_once
from noble_cli.config import digest
from noble_cli.errors import NobleError

KIND = "vqgan-image-tokens"


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint


def resolve_checkpoint(spec: str | os.PathLike, results: str | os.PathLike = "results") -> Path:
    """A VQGAN checkpoint file from a .ckpt path, a run folder, or `recipe:NAME` (see the module docstring)."""
    raw = str(spec).strip()
    if not raw:
        raise NobleError("data.vqgan_checkpoint is empty; give a VQGAN run folder, a .ckpt file or recipe:NAME")
    hint = ""
    if raw.startswith("recipe:"):
        from noble_cli.config import run_id
        from noble_cli.recipes import resolve

        name = raw.split(":", 1)[1]
        path = Path(results) / "runs" / run_id(resolve(name))
        hint = f"; train it first with: noble train {name} (or set data.vqgan_checkpoint=PATH)"
    else:
        path = Path(raw).expanduser()
    if path.is_file():
        return path.resolve()
    for folder in (path / "checkpoints", path):
        for name in ("best.ckpt", "last.ckpt"):
            if (folder / name).is_file():
                return (folder / name).resolve()
    raise NobleError(f"VQGAN checkpoint not found at {path} (no .ckpt file, checkpoints/best.ckpt or "
                     f"checkpoints/last.ckpt){hint}")


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short content id of a checkpoint file (its size and its first and last MiB): a retrained VQGAN gets a new
    one even at the same path, a copied file keeps it."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha1(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise NobleError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if "config" not in ckpt.get("hyper_parameters", {}):
        raise NobleError(f"{path} is not a noble checkpoint (no hyper_parameters.config)")
    return ckpt


def _vqgan_config(ckpt: dict, path: str | os.PathLike):
    from noble_cli.recipes import from_dict

    cfg = from_dict(ckpt["hyper_parameters"]["config"])
    if cfg.task != "vqgan":
        raise NobleError(f"{path} is a {cfg.task!r} checkpoint, not a VQGAN's (task vqgan)")
    return cfg


def checkpoint_config(path: str | os.PathLike):
    """The resolved RunConfig a checkpoint was trained with; it must be a VQGAN's."""
    return _vqgan_config(read_checkpoint(path), path)


def load_vqgan(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """The VQGAN task module rebuilt from a checkpoint (its config, NOBLE branches included), in eval mode."""
    from noble_cli.tasks import get_task

    ckpt = read_checkpoint(path)
    module = get_task("vqgan").build_module(_vqgan_config(ckpt, path))
    module.load_state_dict(ckpt["state_dict"])
    return module.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# encoding and the cache


def token_folder(checkpoint: Path, dataset: str | None = None, root: str | None = None, limit: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, str, dict]:
    """(folder, dataset id, params) of the token cache for this checkpoint and data set; builds nothing."""
    from noble_cli.data.images import resolve_image_dataset
    from noble_cli.data.shards import data_root

    cfg = checkpoint_config(checkpoint)
    source = resolve_image_dataset(dataset or cfg.data.dataset,
                                   root if dataset else (root or cfg.data.root))
    st = checkpoint.stat()
    params = {"checkpoint": str(checkpoint), "checkpoint_size": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns,
              "limit": limit}
    dataset_id = f"vqgan-codes:{source.id}"
    if cache_dir is not None:
        return Path(cache_dir).expanduser(), dataset_id, params
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", source.id).strip("-.")[-40:]
    return data_root() / f"image-tokens-{slug}-{digest([dataset_id, params])}", dataset_id, params


def encode_dataset(checkpoint: str | os.PathLike, dataset: str | None = None, root: str | None = None,
                   limit: int | None = None, cache_dir: str | os.PathLike | None = None, batch_size: int = 256,
                   device: str | torch.device | None = None, force: bool = False, num_workers: int = 0) -> Path:
    """Encode both splits of the VQGAN's data set (or `dataset`) into a token folder; reuse it when current."""
    from noble_cli.data import shards

    checkpoint = resolve_checkpoint(checkpoint)
    folder, dataset_id, params = token_folder(checkpoint, dataset, root, limit, cache_dir)
    return built_once(folder, lambda: shards.is_prepared(folder, dataset_id, params), lambda: folder,
                      lambda: _encode(checkpoint, folder, dataset_id, params, dataset, root, limit, batch_size,
                                      device, num_workers), force)


def _encode(checkpoint: Path, folder: Path, dataset_id: str, params: dict, dataset: str | None, root: str | None,
            limit: int | None, batch_size: int, device: str | torch.device | None, num_workers: int) -> Path:
    from noble_cli.data import shards
    from noble_cli.data.images import load_split, reconstruction_transform, resolve_image_dataset

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module = load_vqgan(checkpoint, device)
    cfg, m = module.cfg, module.model_cfg
    source = resolve_image_dataset(dataset or cfg.data.dataset,
                                   root if dataset else (root or cfg.data.root))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / shards.META_JSON).unlink(missing_ok=True)  # "not done" until the new meta.json lands

    start = time.perf_counter()
    bos = m.codebook_size
    counts, images = {}, {}
    fingerprint = shards.Fingerprint()  # the LM shards' own, so `shards.verify` checks token folders too

    def records(loader, tally: list[int]):
        with torch.inference_mode():
            for batch in loader:
                x = batch[0].as_subclass(torch.Tensor).to(device) * 2.0 - 1.0
                codes = module.model.tokenize(x).cpu().numpy()
                tally[0] += len(codes)
                yield np.concatenate([np.full((len(codes), 1), bos), codes], axis=1).astype("<u2").reshape(-1)

    for split in shards.SPLITS:
        ds, _ = load_split(source, split, reconstruction_transform(source, m.image_size, m.in_channels, False),
                           cfg.data.download)
        if limit is not None:
            ds = Subset(ds, range(min(limit, len(ds))))
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        tally = [0]
        counts[f"{split}_tokens"] = shards.write_split(folder, split, records(loader, tally), fingerprint)
        images[split] = tally[0]
    meta = {
        "format": shards.FORMAT, "version": shards.FORMAT_VERSION, "kind": KIND, "dataset": dataset_id,
        "params": params, "tokenizer": "vqgan", "dtype": "uint16", "codebook_size": m.codebook_size, "bos_id": bos,
        "vocab_size": m.codebook_size + 1, "codes_per_image": m.num_codes, "grid": [m.grid, m.grid],
        "image_size": m.image_size, "in_channels": m.in_channels, "images": images, **counts,
        "total_tokens": counts["train_tokens"] + counts["val_tokens"], "fingerprint": fingerprint.hexdigest(),
        "document_separator": "each image is one record: BOS then its codes, row-major over the patch grid",
        "vqgan_checkpoint": str(checkpoint), "vqgan_recipe": cfg.recipe, "vqgan_variant": cfg.variant,
        "prepare_seconds": round(time.perf_counter() - start, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(folder / shards.META_JSON, meta)
    return folder


def read_token_meta(folder: str | os.PathLike) -> dict:
    from noble_cli.data import shards

    meta = shards.read_meta(folder)
    if meta.get("kind") != KIND:
        raise NobleError(f"{folder} holds no VQGAN image tokens (kind {meta.get('kind')!r})")
    return meta


def load_records(folder: str | os.PathLike, split: str = "train") -> np.ndarray:
    """The split's records as a read-only uint16 array (images, 1 + codes_per_image): BOS then the codes."""
    from noble_cli.data import shards

    meta = read_token_meta(folder)
    tokens = shards.load_tokens(folder, split)
    return tokens.reshape(-1, 1 + int(meta["codes_per_image"]))


def load_codes(folder: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Code indices (images, codes_per_image), BOS removed."""
    return load_records(folder, split)[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# the data module


class CodeSequences(Dataset):
    """Record i -> (x, y) = (record[:-1], record[1:]) as int64."""

    def __init__(self, records: np.ndarray):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        seq = torch.from_numpy(self.records[i].astype(np.int64))
        return seq[:-1], seq[1:]


class ImageTokenDataModule(L.LightningDataModule):
    """Encodes (once, on rank 0) and serves image-token sequences; the eval set is a fixed subset of val."""

    def __init__(self, checkpoint: str, batch_size: int, eval_batches: int, seed: int, dataset: str | None = None,
                 root: str | None = None, limit: int | None = None, cache_dir: str | None = None,
                 encode_batch_size: int = 256, num_workers: int = 0, max_batches: int | None = None):
        super().__init__()
        self.max_batches = max_batches  # micro-batches in the run's budget (default: one pass over the data)
        self.checkpoint_spec, self.dataset, self.root, self.limit = checkpoint, dataset, root, limit
        self.cache_dir, self.encode_batch_size = cache_dir, encode_batch_size
        self.batch_size, self.eval_batches, self.seed, self.num_workers = batch_size, eval_batches, seed, num_workers
        self.folder: Path | None = None
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        self.folder = encode_dataset(self.checkpoint_spec, self.dataset, self.root, self.limit, self.cache_dir,
                                     self.encode_batch_size)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.folder is None:  # ranks other than 0: rank 0 encoded it in prepare_data
            from noble_cli.data import shards

            folder, dataset_id, params = token_folder(resolve_checkpoint(self.checkpoint_spec), self.dataset,
                                                      self.root, self.limit, self.cache_dir)
            if not shards.is_prepared(folder, dataset_id, params):
                self.prepare_data()
                folder = self.folder
            self.folder = folder
        self.train_set = CodeSequences(load_records(self.folder, "train"))
        val = CodeSequences(load_records(self.folder, "val"))
        n = min(len(val), self.eval_batches * self.batch_size)  # the same set however many devices share it
        order = torch.randperm(len(val), generator=torch.Generator().manual_seed(1234))[:n]
        self.val_set = Subset(val, sorted(order.tolist()))

    def train_dataloader(self) -> DataLoader:
        """Shuffled passes over the codes, each rank its share; the order resumes exactly (data/resumable.py)."""
        from noble_cli.data.resumable import datamodule_train_loader

        self.setup()
        return datamodule_train_loader(self, self.train_set, default_collate)

    def val_dataloader(self) -> DataLoader:
        from noble_cli.data.resumable import datamodule_eval_loader

        self.setup()
        return datamodule_eval_loader(self, self.val_set, default_collate)

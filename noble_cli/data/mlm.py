"""Masked-LM data: WordPiece token shards, BERT's masking, and `MLMDataModule` (fixed, cached eval masks).

Shards. The same folder format as the GPT path (`noble_cli.data.shards`: `train.bin` / `val.bin` of uint16 ids and
`meta.json` written last, every file written atomically) with WordPiece ids instead of GPT-2's: each document's ids
followed by `[SEP]`. The validation documents are the GPT path's (embedded: per source, by sha256 of the document
name, >= 1% of the tokens; HF/local: by blake2b of the text). Folder: `<data root>/mlm/<dataset>-wp<V>-<key>/`, the
key covering the dataset, the vocabulary (sha1 of vocab.txt), lower-casing and `limit`; the data root is the
task's `data.cache_dir`, else `$NOBLE_DATA_DIR`, else `~/.cache/noble/data`.

Sequences. Packed, never padded (as BERT, RoBERTa and most pretraining do): a sequence is
`[CLS] + seq_len - 2 consecutive tokens of the stream + [SEP]`; document boundaries inside it are the stream's
`[SEP]`s. No next-sentence prediction and no segment ids (RoBERTa showed NSP does not help).

Masking (BERT): every token except [PAD] [CLS] [SEP] [MASK] is chosen with probability 15%; a chosen token becomes
[MASK] (80%), a random non-special token (10%) or stays (10%); labels are the original id at chosen positions and
-100 elsewhere, so the loss only sees chosen tokens. Training masks are dynamic (new at every step, as RoBERTa's);
they come from the same generator as the batch's windows, so batch k is a pure function of (seed, k) and a resumed
run sees the batches an uninterrupted one sees (position bookkeeping: `LMDataModule`'s, which this extends).
Evaluation: `eval_batches * batch_size` fixed windows of val.bin at evenly spaced starts, window i masked with a
generator seeded from (eval_seed, i): the same tokens and the same masks at every evaluation, in every run and every
seed (eval_seed is not the run's seed, so runs of different seeds are scored on the same masked set).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from noble_cli.atomic import atomic_write_json, built_once
from noble_cli.config import digest
from noble_cli.console import first_use_note
from noble_cli.data.lm_datamodule import LMDataModule, TrainBatches, batch_seed
from noble_cli.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    META_JSON,
    VAL_FRACTION,
    data_root,
    is_prepared,
    load_tokens,
    local_params,
    prepare_embedded,
    read_meta,
    resolve_dataset,
)
from noble_cli.data.wordpiece import WordPiece, load_vocab, train_or_load
from noble_cli.errors import NobleError

IGNORE_INDEX = -100
EVAL_SEED_SALT = 0x6D6C6D  # "mlm": keeps eval generators apart from the training ones


# ---------------------------------------------------------------------------------------------------------------
# masking


@dataclass(frozen=True)
class Masking:
    """BERT's masking of a batch of token ids (see the module docstring)."""

    mask_id: int
    never_masked: tuple[int, ...]
    random_ids: tuple[int, ...]  # what the "random token" case draws from
    probability: float = 0.15
    mask_ratio: float = 0.8
    random_ratio: float = 0.1

    @classmethod
    def for_vocab(cls, wp: WordPiece, probability: float = 0.15, mask_ratio: float = 0.8,
                  random_ratio: float = 0.1) -> Masking:
        return cls(wp.mask_id, wp.never_masked_ids, tuple(int(i) for i in wp.random_ids), probability, mask_ratio,
                   random_ratio)

    @functools.cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.never_masked, dtype=torch.long), torch.tensor(self.random_ids, dtype=torch.long)

    def __call__(self, ids: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for int64 `ids`; draws from `generator` only (so a seed fixes the masks)."""
        never, random_ids = self._tensors
        chosen = torch.rand(ids.shape, generator=generator) < self.probability
        chosen &= ~torch.isin(ids, never)
        u = torch.rand(ids.shape, generator=generator)
        replacement = random_ids[torch.randint(len(random_ids), ids.shape, generator=generator)]
        to_mask = chosen & (u < self.mask_ratio)
        to_random = chosen & (u >= self.mask_ratio) & (u < self.mask_ratio + self.random_ratio)
        inputs = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        inputs = torch.where(to_random, replacement, inputs)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        return inputs, labels


def with_cls_sep(windows: np.ndarray, cls_id: int, sep_id: int) -> torch.Tensor:
    """(n, L) uint16 windows -> (n, L + 2) int64 `[CLS] window [SEP]`."""
    n = windows.shape[0]
    out = np.empty((n, windows.shape[1] + 2), dtype=np.int64)
    out[:, 0], out[:, -1] = cls_id, sep_id
    out[:, 1:-1] = windows
    return torch.from_numpy(out)


def eval_generator(eval_seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(eval_seed) * 1_000_003 + EVAL_SEED_SALT * 7919 + int(index)) % (1 << 63))


# ---------------------------------------------------------------------------------------------------------------
# shards


def shard_params(dataset: str, wp: WordPiece, limit: int | None, val_fraction: float = VAL_FRACTION) -> dict:
    spec = resolve_dataset(dataset)
    params = {"tokenizer": "wordpiece", "vocab_sha1": wp.sha1, "vocab_size": wp.vocab_size, "lowercase": wp.lowercase,
              "limit": limit, "val_fraction": val_fraction}
    if spec.kind == "local":
        params["files"] = local_params(spec)
    return params


def shard_folder(dataset: str, wp: WordPiece, limit: int | None, root: str | os.PathLike | None = None,
                 val_fraction: float = VAL_FRACTION) -> Path:
    spec = resolve_dataset(dataset)
    base = Path(root).expanduser() if root is not None else data_root()
    key = digest([spec.id, shard_params(dataset, wp, limit, val_fraction)])
    return base / "mlm" / f"{spec.slug}-wp{wp.vocab_size}-{key}"


def prepare_mlm(dataset: str, wp: WordPiece, *, limit: int | None = None, root: str | os.PathLike | None = None,
                val_fraction: float = VAL_FRACTION, force: bool = False, log=None) -> Path:
    """Tokenize `dataset` with `wp` into train.bin / val.bin / meta.json; reuse the folder when it is current."""
    spec = resolve_dataset(dataset)
    if spec.kind == "shards":
        raise NobleError(f"{dataset!r} is a prepared GPT-2 shard folder; the masked-LM task needs raw text")
    params = shard_params(dataset, wp, limit, val_fraction)
    folder = shard_folder(dataset, wp, limit, root, val_fraction)
    return built_once(folder, lambda: is_prepared(folder, spec.id, params), lambda: folder,
                      lambda: _build(dataset, spec, wp, folder, params, limit, val_fraction, log or first_use_note),
                      force)


def _build(dataset: str, spec, wp: WordPiece, folder: Path, params: dict, limit: int | None, val_fraction: float,
           log) -> Path:
    log(f"preparing {dataset} (WordPiece tokens) in {folder} (once; later runs reuse it) ...")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / META_JSON).unlink()  # "not done" until the new meta.json lands
    start = time.perf_counter()
    tag = f"wordpiece:{wp.sha1}"  # heads the content fingerprint
    if spec.kind == "embedded":
        body = prepare_embedded(folder, None, limit, val_fraction, wp.encode_documents, tag)
    else:
        from noble_cli.data.hf_text import prepare_hf

        body = prepare_hf(spec, folder, limit=limit, val_fraction=val_fraction, num_proc=None, hf_cache_dir=None,
                          encode_documents=functools.partial(_encode_wordpiece, str(wp.vocab_path), wp.lowercase),
                          tokenizer=tag)
    fingerprint = body.pop("fingerprint")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "dataset": spec.id, "params": params,
            "tokenizer": "wordpiece", "tokenizer_source": str(wp.vocab_path), "vocab_size": wp.vocab_size,
            "vocab_sha1": wp.sha1, "lowercase": wp.lowercase, "dtype": "uint16",
            "special_ids": {"pad": wp.pad_id, "unk": wp.unk_id, "cls": wp.cls_id, "sep": wp.sep_id,
                            "mask": wp.mask_id},
            "document_separator": "each document is followed by [SEP]", **body, "fingerprint": fingerprint}
    meta["total_tokens"] = meta["train_tokens"] + meta["val_tokens"]
    meta["prepare_seconds"] = round(time.perf_counter() - start, 3)
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(folder / META_JSON, meta)
    log(f"tokenized {dataset} into {meta['total_tokens']:,} WordPiece tokens in {meta['prepare_seconds']:.1f}s "
        f"-> {folder}")
    return folder


@functools.lru_cache(maxsize=4)
def _vocab(path: str, lowercase: bool) -> WordPiece:
    return load_vocab(path, lowercase)


def _encode_wordpiece(vocab_path: str, lowercase: bool, texts: list[str]) -> list[np.ndarray]:
    """`prepare_hf`'s encoder: picklable (by vocab path) for `datasets.map` worker processes."""
    return _vocab(vocab_path, lowercase).encode_documents(texts)


def prepare_all(dataset: str, vocab_size: int, *, vocab: str | None = None, lowercase: bool = True,
                tokenizer_every: int = 1, limit: int | None = None, root: str | os.PathLike | None = None,
                log=None) -> tuple[WordPiece, Path]:
    """The vocabulary (given, cached or trained now) and the shard folder (cached or tokenized now)."""
    if vocab:
        wp = load_vocab(vocab, lowercase)
    else:
        wp = train_or_load(dataset, vocab_size, lowercase=lowercase, every=tokenizer_every, limit=limit, root=root,
                           log=log)
    if wp.vocab_size > vocab_size:
        raise NobleError(f"the vocabulary has {wp.vocab_size} tokens but model.vocab_size is {vocab_size}; "
                         f"set model.vocab_size={wp.vocab_size}")
    return wp, prepare_mlm(dataset, wp, limit=limit, root=root, log=log)


# ---------------------------------------------------------------------------------------------------------------
# datasets


class MLMTrainBatches(TrainBatches):
    """Training batch k: `batch_size * world_size` random windows and their masks from one generator seeded by
    (seed, k); rank r takes its rows. Yields dicts {input_ids, labels}, each (batch_size, seq_len) int64."""

    def __init__(self, path, seq_len: int, batch_size: int, seed: int, masking: Masking, cls_id: int, sep_id: int,
                 **kwargs):
        super().__init__(path, seq_len, batch_size, seed, **kwargs)
        self.masking, self.cls_id, self.sep_id = masking, cls_id, sep_id

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        data = self.shard.data
        span = self.seq_len - 2
        high = len(data) - span + 1
        if high < 1:
            raise NobleError(f"train.bin has {len(data)} tokens, fewer than seq_len - 2 = {span}")
        g = torch.Generator().manual_seed(batch_seed(self.seed, index))
        starts = torch.randint(0, high, (self.batch_size * self.world_size,), generator=g).tolist()
        ids = with_cls_sep(np.stack([data[s: s + span] for s in starts]), self.cls_id, self.sep_id)
        inputs, labels = self.masking(ids, g)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return {"input_ids": inputs[rows].contiguous(), "labels": labels[rows].contiguous()}


class MLMEvalSet(Dataset):
    """`n_windows` fixed windows of val.bin at evenly spaced starts, each `[CLS] ... [SEP]`, window i masked by a
    generator seeded from (eval_seed, i). Item i: {input_ids, labels}, each (seq_len,) int64."""

    def __init__(self, path, seq_len: int, n_windows: int, masking: Masking, cls_id: int, sep_id: int,
                 eval_seed: int = 0):
        self.path, self.seq_len, self.n_windows = Path(path), int(seq_len), int(n_windows)
        self.masking, self.cls_id, self.sep_id, self.eval_seed = masking, cls_id, sep_id, int(eval_seed)
        self._data = None
        n, span = len(self.data), self.seq_len - 2
        if n < span:
            raise NobleError(f"val.bin has {n} tokens, fewer than seq_len - 2 = {span}; use a shorter seq_len")
        self.starts = np.linspace(0, n - span, self.n_windows).round().astype(np.int64)
        self.overlapping = self.n_windows > 1 and n < self.n_windows * span

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = load_tokens(self.path, "val")
        return self._data

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = int(self.starts[i])
        ids = with_cls_sep(self.data[None, s: s + self.seq_len - 2], self.cls_id, self.sep_id)
        inputs, labels = self.masking(ids, eval_generator(self.eval_seed, i))
        return {"input_ids": inputs[0], "labels": labels[0]}


class MLMDataModule(LMDataModule):
    """Masked-LM batches: `LMDataModule`'s reproducible, resumable, DDP-aware positions with MLM windows and masks.

    prepare_data trains (or loads) the WordPiece vocabulary and tokenizes the dataset (or loads the cached shards).
    """

    def __init__(self, data: str = "embedded", seq_len: int = 128, batch_size: int = 32, seed: int = 0,
                 eval_batches: int = 20, num_workers: int = 0, *, vocab_size: int = 30522, vocab: str | None = None,
                 lowercase: bool = True, tokenizer_every: int = 1, limit: int | None = None,
                 mlm_probability: float = 0.15, mask_ratio: float = 0.8, random_ratio: float = 0.1,
                 eval_seed: int = 0, cache_dir: str | os.PathLike | None = None, max_steps: int | None = None,
                 pin_memory: bool | None = None, log=None):
        super().__init__(data, seq_len, batch_size, seed, eval_batches, num_workers, cache_dir=cache_dir,
                         max_steps=max_steps, pin_memory=pin_memory)
        if seq_len < 3:
            raise NobleError(f"seq_len must be >= 3 ([CLS] token [SEP]), got {seq_len}")
        self.model_vocab_size, self.vocab, self.lowercase = int(vocab_size), vocab, lowercase
        self.tokenizer_every, self.limit, self.eval_seed = int(tokenizer_every), limit, int(eval_seed)
        self.mlm_probability, self.mask_ratio, self.random_ratio = mlm_probability, mask_ratio, random_ratio
        self.log_fn = log
        self.wordpiece: WordPiece | None = None

    def _prepare(self) -> None:
        if self._path is None or self.wordpiece is None:
            self.wordpiece, self._path = prepare_all(
                os.fspath(self.data), self.model_vocab_size, vocab=self.vocab, lowercase=self.lowercase,
                tokenizer_every=self.tokenizer_every, limit=self.limit, root=self.cache_dir, log=self.log_fn)

    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    @property
    def tokenizer(self) -> WordPiece:
        self.setup()
        return self.wordpiece

    @functools.cached_property
    def masking(self) -> Masking:
        return Masking.for_vocab(self.tokenizer, self.mlm_probability, self.mask_ratio, self.random_ratio)

    def train_batches(self, start: int | None = None) -> MLMTrainBatches:
        rank, world = self._rank_world()
        wp = self.tokenizer
        return MLMTrainBatches(self.path, self.seq_len, self.batch_size, self.seed, self.masking, wp.cls_id, wp.sep_id,
                               start=self._start_step if start is None else start, stop=self.max_steps, rank=rank,
                               world_size=world)

    def val_windows(self) -> MLMEvalSet:
        wp = self.tokenizer
        windows = MLMEvalSet(self.path, self.seq_len, self.eval_batches * self.batch_size, self.masking, wp.cls_id,
                             wp.sep_id, self.eval_seed)
        if windows.overlapping:
            import warnings

            warnings.warn(f"val.bin is shorter than {windows.n_windows} x {self.seq_len - 2} tokens: the fixed "
                          "validation windows overlap", stacklevel=2)
        return windows

    def __repr__(self) -> str:
        return (f"MLMDataModule(data={os.fspath(self.data)!r}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"seed={self.seed}, vocab_size={self.model_vocab_size}, eval_batches={self.eval_batches})")


__all__ = ["IGNORE_INDEX", "MLMDataModule", "MLMEvalSet", "MLMTrainBatches", "Masking", "eval_generator",
           "prepare_all", "prepare_mlm", "read_meta", "shard_folder", "with_cls_sep"]

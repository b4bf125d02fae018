"""`LMDataModule`: random next-token windows from prepared uint16 shards, reproducible, resumable and DDP-aware.

Training batch k (k = 0, 1, 2, ... counts batches, not optimizer steps) is a pure function of (seed, k, world size):
`torch.Generator().manual_seed(seed * 1_000_003 + k)` draws `batch_size * world_size` window starts in train.bin;
rank r takes rows [r * batch_size, (r + 1) * batch_size). A window is seq_len + 1 tokens: x = window[:-1],
y = window[1:], both int64 of shape (batch_size, seq_len). Because nothing depends on what came before, a run
resumed at batch k sees exactly the batches an uninterrupted run sees: `set_start_step(k)` or Lightning's
checkpointing of `state_dict()` (the number of batches the trainer has processed) restore the position.

Validation is fixed: `eval_batches * batch_size` windows of val.bin at evenly spaced starts (not overlapping when
val.bin is long enough), identical at every evaluation; under DDP Lightning's DistributedSampler splits them.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    get_worker_info,
)

from noble_cli.data.position import micro_batches_done, rank_and_world
from noble_cli.data.shards import (
    describe,
    load_tokens,
    prepare,
    read_meta,
    resolve_dataset,
    shard_dir,
)
from noble_cli.data.text_tokenizers import get_tokenizer
from noble_cli.errors import NobleError

__all__ = ["LMDataModule", "TrainBatches", "ValWindows", "batch_seed", "describe"]

_SEED_MULT = 1_000_003


def batch_seed(seed: int, index: int) -> int:
    """The generator seed of global training batch `index`."""
    return (int(seed) * _SEED_MULT + int(index)) % (1 << 63)


class _Shard:
    """Opens the memmap lazily, per process (a pickled memmap would copy the whole array into each worker)."""

    def __init__(self, path: str | os.PathLike, split: str):
        self.path, self.split = Path(path), split
        self._data: np.ndarray | None = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = load_tokens(self.path, self.split)
        return self._data

    def __getstate__(self):
        return {"path": self.path, "split": self.split, "_data": None}


class TrainBatches(IterableDataset):
    """Yields whole batches (x, y) for global batch indices start, start + 1, ... (stop excluded, None = forever).

    With DataLoader workers, worker w yields indices start + w, start + w + num_workers, ...; the DataLoader's
    round-robin fetch keeps them in order. Use it with `DataLoader(batch_size=None)`."""

    def __init__(self, path: str | os.PathLike, seq_len: int, batch_size: int, seed: int = 0, *, start: int = 0,
                 stop: int | None = None, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.shard = _Shard(path, "train")
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.start, self.stop, self.rank, self.world_size = int(start), stop, int(rank), int(world_size)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.shard.data
        span = self.seq_len + 1
        high = len(data) - span + 1  # number of valid window starts
        if high < 1:
            raise NobleError(f"train.bin has {len(data)} tokens, fewer than seq_len + 1 = {span}")
        g = torch.Generator().manual_seed(batch_seed(self.seed, index))
        starts = torch.randint(0, high, (self.batch_size * self.world_size,), generator=g)
        starts = starts[self.rank * self.batch_size: (self.rank + 1) * self.batch_size].tolist()
        windows = torch.from_numpy(np.stack([data[s: s + span] for s in starts]).astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self.start + wid
        while self.stop is None or index < self.stop:
            yield self.batch(index)
            index += nworkers

    def __len__(self) -> int:
        """The whole budget, however far a resumed iterator starts: Lightning restores its batch index within the
        epoch and compares it with this length (stop - start would end the epoch early after a resume and force
        a step on a partial gradient accumulation)."""
        if self.stop is None:
            raise TypeError("TrainBatches without stop is infinite")
        return self.stop


class _PositionedLoader(DataLoader):
    """A DataLoader over TrainBatches whose every new iterator starts at `position()`."""

    def __init__(self, position, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def __iter__(self):
        self.dataset.start = self._position()  # set before workers are forked: each copies it
        return super().__iter__()


class ValWindows(Dataset):
    """`n_windows` fixed windows of val.bin at evenly spaced starts; item i is (x, y), each (seq_len,) int64."""

    def __init__(self, path: str | os.PathLike, seq_len: int, n_windows: int):
        self.shard = _Shard(path, "val")
        self.seq_len, self.n_windows = int(seq_len), int(n_windows)
        n = len(self.shard.data)
        span = self.seq_len + 1
        if n < span:
            raise NobleError(f"val.bin has {n} tokens, fewer than seq_len + 1 = {span}; use a shorter seq_len")
        self.starts = np.linspace(0, n - span, self.n_windows).round().astype(np.int64)
        self.overlapping = self.n_windows > 1 and n < self.n_windows * span

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i])
        w = torch.from_numpy(self.shard.data[s: s + self.seq_len + 1].astype(np.int64))
        return w[:-1], w[1:]


class LMDataModule(L.LightningDataModule):
    """Next-token batches from prepared shards.

    data: a prepared shard folder or a dataset argument of `prepare` ("embedded", "openwebtext", "fineweb-edu",
        "hf:<name>[:<config>]", a path to .txt/.jsonl/.parquet); `prepare_data` builds it if needed.
    max_steps: if given, the train loader stops after global batch max_steps - 1 (so it has a length); else it is
        infinite and the trainer must stop on max_steps.
    tokenizer: "gpt2" or "bytes" (`noble_cli.data.text_tokenizers`): which shards of `data` to use; a prepared
        folder given as `data` must hold that tokenizer's ids.
    """

    def __init__(self, data: str | os.PathLike = "embedded", seq_len: int = 1024, batch_size: int = 8, seed: int = 0,
                 eval_batches: int = 20, num_workers: int = 0, *, cache_dir: str | os.PathLike | None = None,
                 max_steps: int | None = None, pin_memory: bool | None = None, tokenizer: str = "gpt2"):
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("eval_batches", eval_batches)):
            if int(value) < 1:
                raise NobleError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise NobleError(f"num_workers must be >= 0, got {num_workers}")
        resolve_dataset(data)  # a bad name fails here, before any training setup
        self.tokenizer_name = get_tokenizer(tokenizer).name
        self.data, self.cache_dir = data, cache_dir
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.eval_batches, self.num_workers, self.max_steps = int(eval_batches), int(num_workers), max_steps
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._start_step = 0
        self._path: Path | None = None

    # -- data -----------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        prepare(self.data, self.cache_dir, tokenizer=self.tokenizer_name)

    def setup(self, stage: str | None = None) -> None:
        if self._path is None:
            self._path = shard_dir(self.data, self.cache_dir, build=True, tokenizer=self.tokenizer_name)

    @property
    def path(self) -> Path:
        self.setup()
        return self._path

    @property
    def meta(self) -> dict:
        return read_meta(self.path)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    # -- position ---------------------------------------------------------------------------------------------------
    def set_start_step(self, step: int) -> None:
        """The next `train_dataloader()` starts at global batch `step` (batches, not optimizer steps)."""
        if step < 0:
            raise ValueError(f"start step must be >= 0, got {step}")
        self._start_step = int(step)

    @property
    def start_step(self) -> int:
        return self._start_step

    def _batches_done(self) -> int:
        """Global index of the next training batch: the trainer's position when one is attached.

        Batches are a pure function of (seed, index), so the position is all that a resume needs. It is read each
        time an iterator starts, because Lightning may start the train iterator more than once around a restore.
        """
        trainer = getattr(self, "trainer", None)
        return self._start_step if trainer is None else micro_batches_done(trainer)

    def state_dict(self) -> dict:
        return {"next_batch": self._batches_done(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            warnings.warn(f"resuming with seed {self.seed}, but the checkpoint's data seed was {state['seed']}: "
                          "batches will differ from the original run", stacklevel=2)
        self.set_start_step(int(state.get("next_batch", 0)))

    def _rank_world(self) -> tuple[int, int]:
        return rank_and_world(getattr(self, "trainer", None))

    # -- loaders ----------------------------------------------------------------------------------------------------
    def train_batches(self, start: int | None = None) -> TrainBatches:
        rank, world = self._rank_world()
        return TrainBatches(self.path, self.seq_len, self.batch_size, self.seed,
                            start=self._start_step if start is None else start, stop=self.max_steps, rank=rank,
                            world_size=world)

    def train_dataloader(self) -> DataLoader:
        return _PositionedLoader(self._batches_done, self.train_batches(), batch_size=None,
                                 num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=False,
                                 prefetch_factor=2 if self.num_workers > 0 else None)

    def val_windows(self) -> ValWindows:
        windows = ValWindows(self.path, self.seq_len, self.eval_batches * self.batch_size)
        if windows.overlapping:
            warnings.warn(f"val.bin is shorter than {windows.n_windows} x {self.seq_len + 1} tokens: the fixed "
                          "validation windows overlap", stacklevel=2)
        return windows

    def val_dataloader(self) -> DataLoader:
        """The fixed windows, split across ranks: each device scores its share of the same set (Lightning's
        `sync_dist` averages the shares), so the eval loss does not depend on the device count. Where the windows
        do not divide evenly, DistributedSampler repeats up to world_size - 1 of them to even the shares."""
        windows = self.val_windows()
        rank, world = self._rank_world()
        sampler = DistributedSampler(windows, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(windows, batch_size=self.batch_size, sampler=sampler, shuffle=False, drop_last=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def describe(self) -> dict:
        return describe(self.path)

    def __repr__(self) -> str:
        return (f"LMDataModule(data={os.fspath(self.data)!r}, seq_len={self.seq_len}, batch_size={self.batch_size}, "
                f"seed={self.seed}, eval_batches={self.eval_batches}, num_workers={self.num_workers})")

"""Training loaders over map-style datasets (images, image-token sequences) that resume exactly.

The language-model batches are a pure function of (seed, batch index) already (`lm_datamodule.TrainBatches`). Here
the same property is given to a shuffled map-style dataset:

- the order: `ResumableSampler` is a DistributedSampler (a permutation per epoch from the seed, each rank its share)
  that can start an epoch part-way; `ResumingLoader` sets the epoch and the offset from the trainer's position
  (optimizer steps x accumulation = micro-batches consumed) every time an iterator starts;
- the augmentations: the sampler yields *codes* `epoch * n + index`, and `SeededSamples` draws each sample's random
  transforms (crops, flips, RandAugment, random erasing) from a seed derived from (seed, code); `SeededCollate` does
  the same for the batch's Mixup/CutMix, from the batch's first code. Both fork the RNG, so nothing else's stream
  moves, and both are plain classes, so loader workers can pickle them.

A resumed run thus sees the same batches with the same augmentations as the uninterrupted run.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from noble_cli.seeding import derive_seed


class SeededSamples(Dataset):
    """`base[i]` drawn with its random transforms seeded by (seed, epoch, i); indexed by code = epoch * n + i.
    Returns the base item's fields plus the code (for `SeededCollate`)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), len(self.base))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, epoch, index))
            item = self.base[index]
        return (*item, int(code))


class SeededCollate:
    """Drops the codes and runs `collate` (e.g. Mixup/CutMix) with an RNG seeded by the batch's first code."""

    def __init__(self, collate: Callable, seed: int):
        self.collate, self.seed = collate, int(seed)

    def __call__(self, items):
        code = items[0][-1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, code, 1))  # 1: not the stream of sample `code` itself
            return self.collate([item[:-1] for item in items])


class ResumableSampler(DistributedSampler):
    """Shuffled, seeded, per-rank (drop_last) sample codes of one epoch; `skip` codes are dropped from the start of
    the next iteration only. Its length stays the full epoch's, which is what Lightning counts batches against."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        n = len(self.dataset)
        codes = [self.epoch * n + i for i in super().__iter__()]
        skip, self.skip = self.skip, 0
        return iter(codes[skip:])


class ResumingLoader(DataLoader):
    """A DataLoader over a ResumableSampler whose every new iterator starts at `position()` micro-batches into the
    run: epoch = position // batches per epoch, offset = the rest."""

    def __init__(self, position: Callable[[], int], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def __iter__(self):
        per_epoch = len(self)
        if per_epoch:
            epoch, offset = divmod(self._position(), per_epoch)
            self.sampler.set_epoch(epoch)  # after Lightning's own set_epoch: the trainer's position is the truth
            self.sampler.skip = offset * self.batch_size
        return super().__iter__()


def resumable_train_loader(dataset: Dataset, *, batch_size: int, seed: int, rank: int, world: int,
                           position: Callable[[], int], collate: Callable, num_workers: int = 0,
                           pin_memory: bool = False) -> ResumingLoader:
    """The training loader of a map-style dataset: exact resume of order and augmentations (module docstring)."""
    samples = SeededSamples(dataset, seed)
    return ResumingLoader(
        position, samples, batch_size=batch_size, sampler=ResumableSampler(samples, world, rank, seed),
        drop_last=True, collate_fn=SeededCollate(collate, seed), num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=pin_memory,
    )


def trainer_position(datamodule) -> int:
    """Micro-batches consumed so far by the datamodule's trainer (0 without one): optimizer steps x accumulation."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 0
    return int(trainer.global_step) * int(trainer.accumulate_grad_batches)

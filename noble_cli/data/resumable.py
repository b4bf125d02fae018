"""Training loaders over map-style datasets (images, image-token sequences) that resume exactly.

The language-model batches are a pure function of (seed, batch index) already (`lm_datamodule.TrainBatches`), and
the whole budget is one Lightning "epoch". The same is done here for a shuffled map-style dataset:

- the order: `BudgetSampler` yields the whole run's samples as one stream, pass after pass over the data (a fresh
  seeded permutation per pass, each rank its share, the tail that does not fill a batch dropped), and can start at
  any batch of that stream. `ResumingLoader` starts it at the trainer's position (optimizer steps x accumulation =
  micro-batches consumed) every time an iterator starts. Passes are not Lightning epochs, so Lightning never ends an
  epoch on a partial gradient accumulation (which would force a step and break the position arithmetic);
- the augmentations: the sampler yields *codes* `pass * n + index`, and `SeededSamples` draws each sample's random
  transforms (crops, flips, RandAugment, random erasing) from a seed derived from (seed, code); `SeededCollate` does
  the same for the batch's Mixup/CutMix, from the batch's first code. Both fork the RNG, so nothing else's stream
  moves, and both are plain classes, so loader workers can pickle them.

A resumed run thus sees the same batches with the same augmentations as the uninterrupted run. The matching
evaluation loader (`datamodule_eval_loader`) is here too: both serve the image and image-token data modules.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from noble_cli.data.position import micro_batches_done, rank_and_world
from noble_cli.errors import NobleError
from noble_cli.seeding import BATCH_AUGMENT, DATA_ORDER, SAMPLE_AUGMENT, derive_seed


class SeededSamples(Dataset):
    """`base[i]` drawn with its random transforms seeded by (seed, pass, i); indexed by code = pass * n + i.
    Returns the base item's fields plus the code (for `SeededCollate`)."""

    def __init__(self, base: Dataset, seed: int):
        self.base, self.seed = base, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, code: int):
        epoch, index = divmod(int(code), len(self.base))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, SAMPLE_AUGMENT, epoch, index))
            item = self.base[index]
        return (*item, int(code))


class SeededCollate:
    """Drops the codes and runs `collate` (e.g. Mixup/CutMix) with an RNG seeded by the batch's first code."""

    def __init__(self, collate: Callable, seed: int):
        self.collate, self.seed = collate, int(seed)

    def __call__(self, items):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, BATCH_AUGMENT, items[0][-1]))
            return self.collate([item[:-1] for item in items])


class BudgetSampler(Sampler):
    """The codes of `total_batches` batches of this rank, pass after pass over `n` samples.

    Pass p is a permutation seeded by (seed, p); rank r takes every world-th of its first n // world * world
    entries (as DistributedSampler with drop_last), and each pass keeps only whole batches. `start_batch` is where
    the next iteration begins. Its length is the whole budget's, which is what Lightning counts batches against.
    """

    def __init__(self, n: int, num_replicas: int, rank: int, seed: int, batch_size: int, total_batches: int):
        self.n, self.world, self.rank, self.seed = int(n), int(num_replicas), int(rank), int(seed)
        self.batch_size, self.total_batches = int(batch_size), int(total_batches)
        self.per_pass = (self.n // self.world) // self.batch_size  # whole batches per pass, per rank
        if self.per_pass < 1:
            raise NobleError(f"the training set has {self.n} samples: over {self.world} device(s) they do not fill "
                             f"one batch of {self.batch_size}; lower trainer.batch_size")
        self.start_batch = 0

    def __len__(self) -> int:
        return self.total_batches * self.batch_size

    def pass_codes(self, p: int) -> list[int]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, DATA_ORDER, p))
        order = torch.randperm(self.n, generator=g)[: self.n // self.world * self.world]
        share = order[self.rank:: self.world][: self.per_pass * self.batch_size]
        return (share + p * self.n).tolist()

    def __iter__(self):
        batch = self.start_batch
        while batch < self.total_batches:
            p, offset = divmod(batch, self.per_pass)
            end = min(self.per_pass, offset + self.total_batches - batch)
            yield from self.pass_codes(p)[offset * self.batch_size: end * self.batch_size]
            batch += end - offset


class ResumingLoader(DataLoader):
    """A DataLoader over a BudgetSampler whose every new iterator starts at `position()` micro-batches."""

    def __init__(self, position: Callable[[], int], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def __iter__(self):
        self.sampler.start_batch = self._position()  # in the main process: workers only receive the indices
        return super().__iter__()


def resumable_train_loader(dataset: Dataset, *, batch_size: int, seed: int, rank: int, world: int,
                           total_batches: int, position: Callable[[], int], collate: Callable,
                           num_workers: int = 0, pin_memory: bool = False) -> ResumingLoader:
    """The training loader of a map-style dataset for a budget of `total_batches` micro-batches per rank: exact
    resume of order and augmentations (module docstring)."""
    samples = SeededSamples(dataset, seed)
    sampler = BudgetSampler(len(samples), world, rank, seed, batch_size, total_batches)
    return ResumingLoader(
        position, samples, batch_size=batch_size, sampler=sampler, drop_last=True,
        collate_fn=SeededCollate(collate, seed), num_workers=num_workers, persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def datamodule_train_loader(datamodule, dataset: Dataset, collate: Callable) -> ResumingLoader:
    """The training loader of an image or image-token data module (its batch_size, seed, num_workers and
    max_batches): the run's budget of micro-batches (default: one pass), resuming at the trainer's position."""
    rank, world = rank_and_world(getattr(datamodule, "trainer", None))
    total = datamodule.max_batches or len(dataset) // world // datamodule.batch_size
    return resumable_train_loader(dataset, batch_size=datamodule.batch_size, seed=datamodule.seed, rank=rank,
                                  world=world, total_batches=total, position=lambda: trainer_position(datamodule),
                                  collate=collate, num_workers=datamodule.num_workers,
                                  pin_memory=torch.cuda.is_available())


def datamodule_eval_loader(datamodule, dataset: Dataset, collate: Callable) -> DataLoader:
    """The evaluation loader of the same data modules: the fixed eval set in order, each rank its share
    (DistributedSampler pads the last share with repeats so that the ranks' means average to the set's)."""
    rank, world = rank_and_world(getattr(datamodule, "trainer", None))
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=datamodule.batch_size, sampler=sampler, collate_fn=collate,
                      num_workers=datamodule.num_workers, persistent_workers=datamodule.num_workers > 0,
                      pin_memory=torch.cuda.is_available())


def trainer_position(datamodule) -> int:
    """Micro-batches consumed so far by the datamodule's trainer (0 without one)."""
    return micro_batches_done(getattr(datamodule, "trainer", None))

"""Where a data module stands: which process it feeds (rank of world) and how many micro-batches its trainer has
consumed. Every training loader here starts at that position, so a resumed run sees the batches an uninterrupted
one would (the whole budget is one Lightning epoch, so every accumulation window is complete)."""

from __future__ import annotations

import torch


def rank_and_world(trainer) -> tuple[int, int]:
    """(this process's rank, the number of processes): the trainer's; without one, torch.distributed's when it is
    initialised (a loader built outside Lightning in a distributed job), else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def micro_batches_done(trainer) -> int:
    """Micro-batches the trainer has consumed: optimizer steps x accumulation (0 without a trainer)."""
    if trainer is None:
        return 0
    return int(trainer.global_step) * int(trainer.accumulate_grad_batches)

"""Seeds derived from a run's seed and a position (a step, a micro-batch, a sample): what makes a resumed run draw
exactly what the uninterrupted run drew, with no RNG state to save (Lightning's checkpoints carry none)."""

from __future__ import annotations

_MASK = 2**64 - 1
_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 mixing: neighbouring positions get unrelated streams)."""
    z = 0
    for i, part in enumerate(parts):
        z = (z + (int(part) + 1) * _MULTIPLIERS[i % len(_MULTIPLIERS)]) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
    return z >> 1


# Domain tags: the first part after the run's seed, so that streams of different uses never coincide.
DATA_ORDER, SAMPLE_AUGMENT, BATCH_AUGMENT, STEP = 1, 2, 3, 4

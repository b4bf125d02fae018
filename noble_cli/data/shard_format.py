"""The on-disk format of tokenized LM shards (what `noble_cli.data.shards` prepares and reads; also written by
`noble_cli.data.hf_text`): uint16 token files per split, fingerprinted, written atomically."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from noble_cli.atomic import atomic_file

FORMAT = "noble-lm-shards"
FORMAT_VERSION = 1
VAL_BUCKETS = 10_000  # documents are hashed into this many buckets; the first val_fraction of them are validation
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class Fingerprint:
    """sha256 over the train tokens then the val tokens (little-endian uint16 bytes), headed by the tokenizer."""

    def __init__(self, tokenizer: str = "gpt2") -> None:
        self.h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}/{tokenizer}".encode())

    def update(self, split: str, arr: np.ndarray) -> None:
        self.h.update(np.ascontiguousarray(arr, dtype="<u2").data)

    def hexdigest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def write_split(folder: Path, split: str, chunks: Iterable[np.ndarray], fingerprint: Fingerprint) -> int:
    """Write `<split>.bin` atomically from uint16 chunks; returns the token count."""
    n = 0
    with atomic_file(folder / f"{split}.bin") as f:
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype="<u2")
            fingerprint.update(split, chunk)
            f.write(chunk.data)
            n += chunk.size
    return n

"""Byte-level "tokenizer": a text is its UTF-8 bytes (ids 0-255), each document followed by end-of-text (256).

Why: with GPT-2's 50,257-wide vocabulary a CPU-sized model spends nearly all its parameters and compute in the
embedding and the head. With 257 ids the compute goes into the transformer, nothing has to be trained or
downloaded, and it is exact: decode(encode(text)) == text for any text, and a token stands for exactly one byte
(end-of-text for none), so bits per byte need no table beyond a vector of ones.

Text that cannot be encoded as UTF-8 (lone surrogates, from JSON escapes) is first repaired the way tiktoken
repairs it (each bad code point becomes U+FFFD), so the byte shards hold the same text as the GPT-2 ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOKENIZER_NAME = "bytes"
EOT_ID = 256
VOCAB_SIZE = 257


def utf8(text: str) -> bytes:
    """The UTF-8 bytes of `text`; lone surrogates become U+FFFD (as tiktoken does before its BPE)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def encode(text: str) -> list[int]:
    return list(utf8(text))


def decode(ids: Sequence[int] | np.ndarray) -> str:
    """Ids back to text; end-of-text ids are dropped, invalid UTF-8 (a window cut mid-character) becomes U+FFFD."""
    return bytes(int(i) for i in ids if int(i) != EOT_ID).decode("utf-8", errors="replace")


def encode_documents(texts: Sequence[str], *, eot: bool = True, num_threads: int | None = None) -> list[np.ndarray]:
    """Each text as a uint16 array of its bytes, followed by end-of-text (256) when `eot`. (`num_threads` is
    accepted for the GPT-2 encoder's signature; bytes need no threads.)"""
    out = []
    for text in texts:
        raw = np.frombuffer(utf8(text), dtype=np.uint8)
        arr = np.empty(raw.size + int(eot), dtype=np.uint16)
        arr[: raw.size] = raw
        if eot:
            arr[-1] = EOT_ID
        out.append(arr)
    return out


def token_bytes() -> np.ndarray:
    """UTF-8 bytes each id stands for: 1 for ids 0-255, 0 for end-of-text."""
    table = np.ones(VOCAB_SIZE, dtype=np.int64)
    table[EOT_ID] = 0
    return table

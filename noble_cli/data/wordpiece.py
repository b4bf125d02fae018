"""BERT's WordPiece tokenizer, offline: a vocabulary trained on the corpus with `tokenizers`, or a given vocab.txt.

The tokenizer is BERT's (`BertWordPieceTokenizer` in `tokenizers`): BertNormalizer (clean text, split CJK characters,
lower-case and strip accents when `lowercase`), BertPreTokenizer (whitespace and punctuation), WordPiece with `##`
continuation pieces and `[UNK]`, `[CLS] ... [SEP]` around an encoded text. Ids 0-4 are
`[PAD] [UNK] [CLS] [SEP] [MASK]` in a trained vocabulary (a given vocab.txt keeps its own ids, e.g. 0/100/101/102/103
in bert-base-uncased's).

Why not `tokenizers.trainers.WordPieceTrainer` directly: it is not deterministic. It gives the `##c` pieces ids in the
iteration order of a Rust HashMap (random per process) and breaks ties between equally frequent merges by those ids,
so two trainings on the same text give different vocabularies (measured: 4 different sets in 5 runs at 4,096
tokens). Here the training is the same algorithm made deterministic:

1. word counts are taken in Python (BertNormalizer + BertPreTokenizer, the tokenizer's own, applied to each distinct
   whitespace-separated chunk), the alphabet is the `limit_alphabet` most frequent characters (ties by code point),
   and words with other characters are left out (they encode as `[UNK]`, as in BERT);
2. inside a word, every character after the first is replaced by a private-use code point of its own
   (U+F0000 + its rank in the alphabet), so "continuation c" and "word-initial c" are different symbols that sort by
   code point;
3. `tokenizers`' BPE trainer runs on those words (WhitespaceSplit, no prefix): its alphabet is sorted by code point
   and its ties are broken by id, so the merges are deterministic;
4. every learned piece is mapped back: one that starts with a continuation symbol is `##` + its text, the others are
   their text. [PAD] [UNK] [CLS] [SEP] [MASK] come first; then the pieces in the trainer's id order.

The result is cached as `vocab.txt` (written atomically) in `<data root>/wordpiece/<dataset>-v<size>-<key>/`, with a
`tokenizer.json` describing how it was made; a second call loads it (well under a second).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from noble_cli.atomic import built_once
from noble_cli.config import digest
from noble_cli.errors import NobleError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
ALGORITHM = "noble-wordpiece/1"  # part of the cache key: bump when training changes
LIMIT_ALPHABET = 1000  # BertWordPieceTokenizer's default
MIN_FREQUENCY = 2  # idem
_CONT_BASE = 0xF0000  # Supplementary Private Use Area-A: U+F0000..U+FFFFD (65,534 code points)
MAX_VOCAB = 1 << 16  # ids are stored as uint16


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer


def _build(vocab: dict[str, int], lowercase: bool):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.BertProcessing((SEP, vocab[SEP]), (CLS, vocab[CLS]))
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in SPECIAL_TOKENS])  # already in the vocabulary: marks them special (decode)
    return tok


@dataclass(frozen=True, eq=False)
class WordPiece:
    """A loaded WordPiece vocabulary: encode, decode and the special ids."""

    vocab_path: Path
    lowercase: bool
    tokens: tuple[str, ...]  # id -> token

    @functools.cached_property
    def tokenizer(self):
        return _build({t: i for i, t in enumerate(self.tokens)}, self.lowercase)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def id(self, token: str) -> int:
        try:
            return self.tokens.index(token)
        except ValueError:
            raise NobleError(f"vocabulary {self.vocab_path} has no {token} token") from None

    @functools.cached_property
    def pad_id(self) -> int:
        return self.id(PAD)

    @functools.cached_property
    def unk_id(self) -> int:
        return self.id(UNK)

    @functools.cached_property
    def cls_id(self) -> int:
        return self.id(CLS)

    @functools.cached_property
    def sep_id(self) -> int:
        return self.id(SEP)

    @functools.cached_property
    def mask_id(self) -> int:
        return self.id(MASK)

    @property
    def never_masked_ids(self) -> tuple[int, ...]:
        """Tokens the MLM objective never chooses: [PAD] [CLS] [SEP] [MASK] ([UNK] stands for a real word)."""
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id)

    @functools.cached_property
    def random_ids(self) -> np.ndarray:
        """Ids a chosen token may be replaced with (the 10% "random" case): every piece that is not `[...]`."""
        return np.array([i for i, t in enumerate(self.tokens) if not (t.startswith("[") and t.endswith("]"))],
                        dtype=np.int64)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids; `[CLS] ... [SEP]` around them when `add_special_tokens`."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_documents(self, texts: Sequence[str], sep: bool = True) -> list[np.ndarray]:
        """Each text as a uint16 array of its ids, followed by `[SEP]` when `sep` (Rust threads, no offsets)."""
        out = []
        for enc in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False):
            ids = enc.ids
            arr = np.empty(len(ids) + int(sep), dtype=np.uint16)
            arr[: len(ids)] = ids
            if sep:
                arr[-1] = self.sep_id
            out.append(arr)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def sha1(self) -> str:
        return hashlib.sha1("\n".join(self.tokens).encode("utf-8")).hexdigest()


def load_vocab(path: str | os.PathLike, lowercase: bool = True) -> WordPiece:
    """A WordPiece tokenizer from a BERT `vocab.txt` (one token a line, line number = id)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except FileNotFoundError:
        raise NobleError(f"vocabulary file {str(path)!r} does not exist") from None
    if lines and lines[-1] == "":
        lines.pop()
    tokens = tuple(line.rstrip("\r") for line in lines)
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise NobleError(f"vocabulary {str(path)!r} lacks {', '.join(missing)}; a BERT vocab.txt has all of "
                         f"{' '.join(SPECIAL_TOKENS)}")
    if len(set(tokens)) != len(tokens):
        raise NobleError(f"vocabulary {str(path)!r} has duplicate tokens")
    if len(tokens) > MAX_VOCAB:
        raise NobleError(f"vocabulary {str(path)!r} has {len(tokens)} tokens; at most {MAX_VOCAB} fit in uint16")
    return WordPiece(path, lowercase, tokens)


# ---------------------------------------------------------------------------------------------------------------
# training


def count_words(texts: Iterable[str], lowercase: bool = True) -> Counter:
    """Words (as BERT's normalizer and pre-tokenizer cut them) and how often each occurs.

    The pre-tokenizer only splits, so it is run once per distinct whitespace-separated chunk, not per occurrence
    (the same counts, ~3x faster)."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
                                      lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    chunks: Counter = Counter()
    for text in texts:
        chunks.update(norm.normalize_str(text).split())
    words: Counter = Counter()
    for chunk, n in chunks.items():
        for word, _ in pre.pre_tokenize_str(chunk):
            words[word] += n
    return words


def train_vocab(words: Counter, vocab_size: int, *, min_frequency: int = MIN_FREQUENCY,
                limit_alphabet: int = LIMIT_ALPHABET) -> list[str]:
    """A WordPiece vocabulary (specials first) of at most `vocab_size` tokens from word counts; deterministic."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise NobleError(f"vocab_size {vocab_size} is too small; it must exceed {len(SPECIAL_TOKENS)}")
    if vocab_size > MAX_VOCAB:
        raise NobleError(f"vocab_size {vocab_size} does not fit uint16 ids (at most {MAX_VOCAB})")
    chars: Counter = Counter()
    for word, n in words.items():
        for ch in word:
            chars[ch] += n
    alphabet = sorted(sorted(chars), key=lambda c: -chars[c])[:limit_alphabet]  # most frequent, ties by code point
    if len(alphabet) > 0xFFFFD - _CONT_BASE:
        raise NobleError(f"alphabet of {len(alphabet)} characters is too large")
    rank = {ch: i for i, ch in enumerate(sorted(alphabet))}
    cont = {ch: chr(_CONT_BASE + i) for ch, i in rank.items()}
    back = {v: k for k, v in cont.items()}
    mapped = sorted((w[0] + "".join(cont[c] for c in w[1:]), n) for w, n in words.items()
                    if all(c in rank for c in w))

    def repeated():  # the trainer counts words itself: give it each word as often as it occurs
        for w, n in mapped:
            yield " ".join((w,) * n)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=min_frequency,
                                  show_progress=False)
    tok.train_from_iterator(repeated(), trainer, length=len(mapped))
    pieces = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    vocab = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for piece, _ in pieces:
        text = "".join(back.get(c, c) for c in piece)
        token = "##" + text if piece[0] in back else text
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab


def _write_vocab(path: Path, tokens: Sequence[str]) -> None:
    from noble_cli.atomic import atomic_file

    with atomic_file(path, "w") as f:
        f.write("\n".join(tokens) + "\n")


def train_or_load(dataset: str, vocab_size: int, *, lowercase: bool = True, every: int = 1, limit: int | None = None,
                  root: str | os.PathLike | None = None, texts: Iterable[str] | None = None,
                  force: bool = False, log=None) -> WordPiece:
    """The WordPiece vocabulary trained on `dataset` (every `every`-th document; at most `limit` per embedded source
    or in total for HF/local data), from the cache when there, else trained and cached.

    root: the data root (default `$NOBLE_DATA_DIR` or ~/.cache/noble/data); the vocabulary lands in
        `<root>/wordpiece/<dataset>-v<vocab_size>-<key>/vocab.txt`.
    texts: the documents to train on, when the caller has them (else they are read from `dataset`).
    """
    from noble_cli.data.shards import data_root, resolve_dataset

    spec = resolve_dataset(dataset)
    if spec.kind == "shards":
        raise NobleError(f"{dataset!r} is a GPT-2 shard folder; the masked-LM task needs raw text "
                         "(embedded, an HF dataset or text files), or a data.vocab")
    if every < 1:
        raise NobleError(f"data.tokenizer_every must be >= 1, got {every}")
    params = {"algorithm": ALGORITHM, "dataset": spec.id, "vocab_size": vocab_size, "lowercase": lowercase,
              "every": every, "limit": limit, "min_frequency": MIN_FREQUENCY, "limit_alphabet": LIMIT_ALPHABET}
    if spec.kind == "local":
        params["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in spec.files]
    folder = Path(root).expanduser() if root is not None else data_root()
    folder = folder / "wordpiece" / f"{spec.slug}-v{vocab_size}-{'uncased' if lowercase else 'cased'}-{digest(params)}"
    vocab_path = folder / "vocab.txt"
    return built_once(folder, vocab_path.is_file, lambda: load_vocab(vocab_path, lowercase),
                      lambda: _train(dataset, folder, params, texts, limit, every, log), force)


def _train(dataset: str, folder: Path, params: dict, texts: Iterable[str] | None, limit: int | None, every: int,
           log) -> WordPiece:
    from noble_cli.console import first_use_note

    vocab_size, lowercase, vocab_path = params["vocab_size"], params["lowercase"], folder / "vocab.txt"
    log = log or first_use_note  # a run's first use says what it waits for
    log(f"training a {vocab_size}-token WordPiece vocabulary on {dataset} (once; later runs reuse it) ...")
    start = time.perf_counter()
    if texts is None:
        texts = iter_texts(dataset, limit=limit, every=every)
    else:
        texts = (t for i, t in enumerate(texts) if i % every == 0)
    words = count_words(texts, lowercase)
    counted = time.perf_counter() - start
    if not words:
        raise NobleError(f"no text to train a WordPiece vocabulary on in {dataset!r}")
    tokens = train_vocab(words, vocab_size)
    seconds = time.perf_counter() - start
    folder.mkdir(parents=True, exist_ok=True)
    _write_vocab(vocab_path, tokens)
    from noble_cli.atomic import atomic_file

    with atomic_file(folder / "tokenizer.json", "w") as f:
        json.dump({**params, "tokens": len(tokens), "distinct_words": len(words),
                   "special_tokens": list(SPECIAL_TOKENS), "count_seconds": round(counted, 3),
                   "train_seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f, indent=2)
    log(f"trained a {len(tokens)}-token WordPiece vocabulary on {dataset} in {seconds:.1f}s -> {vocab_path}")
    return load_vocab(vocab_path, lowercase)


def iter_texts(dataset: str, *, limit: int | None = None, every: int = 1, batch_size: int = 1000):
    """Raw documents of a dataset in a fixed order: the embedded corpus (at most `limit` per source) or an HF/local
    dataset (at most `limit` in all; loaded through `datasets`, imported here only); every `every`-th of them."""
    from noble_cli.data.shards import resolve_dataset

    spec = resolve_dataset(dataset)
    if spec.kind == "embedded":
        from noble_cli.data.corpus import iter_source, source_names

        i = 0
        for name in source_names():
            for doc in iter_source(name, limit):
                if i % every == 0:
                    yield doc.text
                i += 1
        return
    from noble_cli.data.hf_text import TEXT_COLUMN, load_text_dataset

    ds = load_text_dataset(spec)
    n = len(ds) if limit is None else min(limit, len(ds))
    if every > 1:
        ds, n = ds.select(range(0, n, every)), len(range(0, n, every))
    for i in range(0, n, batch_size):
        for text in ds[i: min(n, i + batch_size)][TEXT_COLUMN]:
            yield text or ""

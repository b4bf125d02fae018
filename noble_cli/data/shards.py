"""Tokenized LM shards: `train.bin` + `val.bin` (flat np.uint16 ids) + `meta.json`, prepared once and cached.

Layout of a shard folder:
    train.bin   every training document's ids, each document followed by end-of-text (GPT-2: `<|endoftext|>` =
                50256; bytes: 256)
    val.bin     the same for the validation documents
    meta.json   counts, tokenizer, sources, split rule, content fingerprint (written last: it marks the folder done)

Tokenizers (`noble_cli.data.text_tokenizers`): `gpt2` (the default) or `bytes` (UTF-8 bytes). Each has its own
folder: the byte shards of the same data set are a sibling folder with the slug suffix `-bytes`.

Cache folder: `cache_dir` if given (the folder itself), else `$NOBLE_DATA_DIR/<slug>` if that variable is set,
else `~/.cache/noble/data/<slug>`; the slug is the dataset name (`embedded`, `openwebtext`, ...), plus `-bytes`
for byte shards.

Validation split (fixed, document level; never depends on the machine or thread count):
  * `embedded`: within each source, documents are ordered by sha256("<source>/<name>") and taken into validation in
    that order until they hold at least `val_fraction` (1%) of the source's tokens, keeping at least one training
    document. Every source is represented; the full corpus gives ~126k validation GPT-2 tokens (~1.8%: a long last
    document overshoots the 1%). The token counts are GPT-2's whatever the tokenizer, so the byte shards hold
    exactly the GPT-2 shards' validation documents.
  * HF / local data: a document is in validation when blake2b(text) falls in the first `val_fraction` of 10,000
    buckets. If no document lands there (tiny data, e.g. one .txt file), the last tokens of the training stream are
    used instead: max(val_fraction of the tokens, min(10% of them, 50,000)).

Writes are atomic: each file is written to a temp file in the same folder and moved into place with `os.replace`;
`meta.json` is removed before a rebuild starts and written last, so a killed prepare leaves a folder that the next
call rebuilds, never a half-written shard that passes for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from noble_cli.atomic import atomic_write_json, built_once, is_stale_temp
from noble_cli.console import first_use_note
from noble_cli.data.shard_format import (  # noqa: F401 (re-exported: the shard format is part of this module's API)
    FORMAT,
    FORMAT_VERSION,
    LOCAL_SUFFIXES,
    VAL_BUCKETS,
    Fingerprint,
    write_split,
)
from noble_cli.data.text_tokenizers import get_tokenizer
from noble_cli.errors import NobleError

TRAIN_BIN, VAL_BIN, META_JSON = "train.bin", "val.bin", "meta.json"
SPLITS = ("train", "val")
DTYPE = np.uint16
VAL_FRACTION = 0.01
DATA_DIR_ENV = "NOBLE_DATA_DIR"

# Named datasets: name -> (HF path, config). `embedded` is the offline default.
HF_DATASETS: dict[str, tuple[str, str | None]] = {
    "openwebtext": ("Skylion007/openwebtext", None),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
VALID_DATASETS = ("embedded", *HF_DATASETS, "hf:<name>[:<config>]", "a path to .txt/.jsonl/.parquet files or a folder")


def _valid_hint() -> str:
    return "valid: " + ", ".join(VALID_DATASETS)


@dataclass(frozen=True)
class DatasetSpec:
    """A resolved `dataset` argument."""

    kind: str  # "embedded" | "hf" | "local" | "shards" (an already prepared folder)
    id: str  # canonical identity, recorded in meta.json
    slug: str  # default cache folder name
    hf_path: str | None = None
    hf_config: str | None = None
    files: tuple[Path, ...] = field(default_factory=tuple)
    path: Path | None = None  # kind == "shards": the folder


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "data"


def _looks_like_path(dataset: str) -> bool:
    return (os.sep in dataset or dataset.startswith((".", "~")) or Path(dataset).suffix.lower() in LOCAL_SUFFIXES
            or Path(dataset).exists())


def _local_files(root: Path) -> tuple[Path, ...]:
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
    bad = [p for p in files if p.suffix.lower() not in LOCAL_SUFFIXES]
    if bad:
        raise NobleError(f"unsupported data file {str(bad[0])!r}; valid suffixes: {', '.join(LOCAL_SUFFIXES)}")
    if not files:
        raise NobleError(f"no .txt/.jsonl/.json/.parquet files under {str(root)!r}")
    return tuple(files)


def resolve_dataset(dataset: str | os.PathLike) -> DatasetSpec:
    """Parse a dataset argument; raises NobleError naming what is valid."""
    raw = os.fspath(dataset).strip()
    if not raw:
        raise NobleError(f"empty dataset name; {_valid_hint()}")
    if raw == "embedded":
        return DatasetSpec("embedded", "embedded", "embedded")
    if raw in HF_DATASETS:
        path, config = HF_DATASETS[raw]
        return DatasetSpec("hf", f"hf:{path}" + (f":{config}" if config else ""), raw, path, config)
    if raw.startswith("hf:"):
        parts = raw[3:].split(":")
        if len(parts) > 2 or not parts[0]:
            raise NobleError(f"bad HF dataset {raw!r}; write hf:<name> or hf:<name>:<config>, "
                             "e.g. hf:HuggingFaceFW/fineweb-edu:sample-10BT")
        path, config = parts[0], (parts[1] if len(parts) == 2 and parts[1] else None)
        return DatasetSpec("hf", f"hf:{path}" + (f":{config}" if config else ""),
                           _slugify(f"hf-{path}" + (f"-{config}" if config else "")), path, config)
    if _looks_like_path(raw):
        root = Path(raw).expanduser()
        if not root.exists():
            raise NobleError(f"data path {raw!r} does not exist; {_valid_hint()}")
        root = root.resolve()
        if root.is_dir() and (root / META_JSON).is_file():
            return DatasetSpec("shards", f"shards:{root}", root.name, path=root)
        files = _local_files(root)
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:8]
        return DatasetSpec("local", f"local:{root}", _slugify(f"local-{root.stem}-{digest}"), files=files)
    raise NobleError(f"unknown dataset {raw!r}; {_valid_hint()}")


def data_root() -> Path:
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "noble" / "data"


def default_cache_dir(dataset: str | DatasetSpec, sources: Sequence[str] | None = None,
                      limit: int | None = None, tokenizer: str = "gpt2") -> Path:
    spec = dataset if isinstance(dataset, DatasetSpec) else resolve_dataset(dataset)
    if spec.kind == "shards":
        return spec.path
    slug = spec.slug
    if tokenizer != "gpt2":
        slug += f"-{get_tokenizer(tokenizer).name}"
    if spec.kind == "embedded" and sources is not None:
        from noble_cli.data.corpus import check_sources, source_names

        chosen = check_sources(sources)
        if chosen != source_names():
            slug += "-" + "-".join(chosen)
    if limit is not None:
        slug += f"-limit{limit}"
    return data_root() / slug


# ---------------------------------------------------------------------------------------------------------------
# atomic writing


def _remove_dead_temps(folder: Path) -> None:
    """Temp files left by a killed prepare (their process is gone) are removed; live ones are left alone."""
    for p in folder.iterdir():
        if is_stale_temp(p):
            with contextlib.suppress(OSError):
                p.unlink()


# ---------------------------------------------------------------------------------------------------------------
# reading


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NobleError(f"no prepared shards in {str(folder)!r} (no {META_JSON}); "
                         "run: noble data prepare [DATASET] --cache-dir FOLDER") from None
    except json.JSONDecodeError as e:
        raise NobleError(f"corrupt {path}: {e}; rebuild it with: noble data prepare --force") from None


def is_prepared(folder: str | os.PathLike, dataset_id: str | None = None, params: dict | None = None,
                tokenizer: str | None = None) -> bool:
    """True when the folder holds a finished, current shard set (matching `dataset_id`/`params`/`tokenizer` if
    given)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_JSON).read_text())
    except (OSError, ValueError):
        return False
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        return False
    if dataset_id is not None and meta.get("dataset") != dataset_id:
        return False
    if params is not None and meta.get("params") != params:
        return False
    if tokenizer is not None and meta.get("tokenizer") != tokenizer:
        return False
    for split in SPLITS:
        try:
            if (folder / f"{split}.bin").stat().st_size != 2 * int(meta[f"{split}_tokens"]):
                return False
        except (OSError, KeyError, TypeError, ValueError):
            return False
    return True


def load_tokens(folder: str | os.PathLike, split: str = "train") -> np.memmap:
    """The split's token ids as a read-only np.uint16 memmap."""
    if split not in SPLITS:
        raise NobleError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    folder = Path(folder)
    if not is_prepared(folder):
        raise NobleError(f"{str(folder)!r} holds no finished shards; run: noble data prepare")
    path = folder / f"{split}.bin"
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=DTYPE)  # np.memmap refuses empty files
    return np.memmap(path, dtype=DTYPE, mode="r")


def verify(folder: str | os.PathLike) -> bool:
    """Recompute the content fingerprint and compare it with meta.json."""
    meta = read_meta(folder)
    # folders from before the tag was written: GPT-2's, or "bytes" for the first byte shards
    fp = Fingerprint(meta.get("fingerprint_tag") or ("bytes" if meta.get("tokenizer") == "bytes" else "gpt2"))
    for split in SPLITS:
        tokens = load_tokens(folder, split)
        for i in range(0, len(tokens), 1 << 22):
            fp.update(split, tokens[i: i + (1 << 22)])
    return fp.hexdigest() == meta.get("fingerprint")


# ---------------------------------------------------------------------------------------------------------------
# preparing


def _base_meta(spec: DatasetSpec, params: dict, tokenizer: str = "gpt2") -> dict:
    tok = get_tokenizer(tokenizer)
    eot = "<|endoftext|>" if tok.name == "gpt2" else f"end-of-text ({tok.eot_id})"
    return {"format": FORMAT, "version": FORMAT_VERSION, "dataset": spec.id, "params": params,
            "tokenizer": tok.name, "tokenizer_source": tok.source, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "dtype": "uint16", "document_separator": f"each document is followed by {eot}",
            "fingerprint_tag": tok.name}  # what heads the content fingerprint (`verify` needs it)


def embedded_val_split(names: list[str], source: str, lengths: list[int], val_fraction: float) -> set[int]:
    """Indices of the validation documents of one source (see the module docstring)."""
    if len(names) < 2:
        return set()
    order = sorted(range(len(names)), key=lambda i: hashlib.sha256(f"{source}/{names[i]}".encode()).hexdigest())
    target = val_fraction * sum(lengths)
    chosen: set[int] = set()
    got = 0
    for i in order[:-1]:  # keep at least one training document
        if got >= target:
            break
        chosen.add(i)
        got += lengths[i]
    return chosen


def prepare_embedded(folder: Path, sources: Sequence[str] | None, limit: int | None, val_fraction: float,
                     encode_documents: Callable[[list[str]], list[np.ndarray]], tokenizer: str = "gpt2",
                     split_lengths: Callable[[list[str]], list[int]] | None = None) -> dict:
    """Tokenize the embedded corpus into `folder`/{train,val}.bin; returns the meta.json fields it owns.

    encode_documents: texts -> one uint16 array per text, each ending in the tokenizer's document separator (GPT-2:
    `<|endoftext|>`, WordPiece: `[SEP]`). tokenizer: the tag that heads the content fingerprint.
    split_lengths: texts -> the per-document lengths the validation split is decided on (default: the sizes of
    the encoded arrays); the byte shards pass GPT-2's so that both hold the same validation documents."""
    from noble_cli.data.corpus import (
        SOURCES,
        check_sources,
        iter_source,
        source_versions,
    )

    chosen = check_sources(sources)
    versions = source_versions(chosen)  # NobleError naming the missing package, before any work
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    source_meta = []
    for name in chosen:
        docs = list(iter_source(name, limit))
        texts = [d.text for d in docs]
        arrays = encode_documents(texts)
        lengths = [a.size for a in arrays] if split_lengths is None else list(split_lengths(texts))
        val_idx = embedded_val_split([d.name for d in docs], name, lengths, val_fraction)
        train_parts += [a for i, a in enumerate(arrays) if i not in val_idx]
        val_parts += [a for i, a in enumerate(arrays) if i in val_idx]
        val_tokens = sum(arrays[i].size for i in val_idx)
        total = sum(a.size for a in arrays)
        source_meta.append({
            "name": name, "package": f"{SOURCES[name].dist}=={versions[name]}",
            "description": SOURCES[name].description, "documents": len(docs), "tokens": total,
            "train_tokens": total - val_tokens, "val_tokens": val_tokens,
            "val_documents": sorted(docs[i].name for i in val_idx)})
    fp = Fingerprint(tokenizer)
    n_train = write_split(folder, "train", [np.concatenate(train_parts) if train_parts else np.zeros(0, DTYPE)], fp)
    n_val = write_split(folder, "val", [np.concatenate(val_parts) if val_parts else np.zeros(0, DTYPE)], fp)
    return {"train_tokens": n_train, "val_tokens": n_val, "fingerprint": fp.hexdigest(),
            "documents": {"train": len(train_parts), "val": len(val_parts)},
            "val_split": f"per source: documents ordered by sha256('<source>/<name>'), taken into val until they hold "
                         f">= {val_fraction:g} of the source's tokens",
            "sources": source_meta}


def local_params(spec: DatasetSpec) -> list:
    """[path, size, mtime_ns] of each local file: part of the cache key, so edited files are tokenized again."""
    out = []
    for p in spec.files:
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def prepare(dataset: str | os.PathLike = "embedded", cache_dir: str | os.PathLike | None = None, *,
            force: bool = False, sources: Sequence[str] | None = None, limit: int | None = None,
            val_fraction: float = VAL_FRACTION, num_proc: int | None = None,
            hf_cache_dir: str | os.PathLike | None = None, tokenizer: str = "gpt2") -> Path:
    """Tokenize `dataset` into `train.bin`/`val.bin`/`meta.json` and return the folder; reuse it when current.

    dataset: "embedded" (default), "openwebtext", "fineweb-edu", "hf:<name>[:<config>]", a path to
        .txt/.jsonl/.parquet files (or a folder of them), or an already prepared shard folder.
    sources / limit: only these embedded sources / at most `limit` documents per source (or in total for HF and
        local data): quick subsets for tests. They are part of the cache key and of the default folder name.
    num_proc: tokenizer threads (embedded) or `datasets.map` processes (HF/local); default: the usable CPU count.
    tokenizer: "gpt2" (default) or "bytes"; each has its own folder (see the module docstring).
    """
    spec = resolve_dataset(dataset)
    tok = get_tokenizer(tokenizer)
    if spec.kind == "shards":
        if not is_prepared(spec.path):
            raise NobleError(f"{str(spec.path)!r} has a {META_JSON} but its shards are incomplete; "
                             "prepare the dataset again")
        have = read_meta(spec.path).get("tokenizer")
        if have != tok.name:
            raise NobleError(f"{str(spec.path)!r} holds {have} shards, not {tok.name}; set the tokenizer to {have} "
                             f"or point at {tok.name} shards")
        return spec.path
    if not 0.0 < val_fraction < 0.5:
        raise NobleError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    if limit is not None and limit < 1:
        raise NobleError(f"limit must be >= 1, got {limit}")
    params: dict = {"val_fraction": val_fraction, "limit": limit}
    if spec.kind == "embedded":
        from noble_cli.data.corpus import check_sources

        params["sources"] = check_sources(sources)
    elif sources is not None:
        raise NobleError(f"sources only apply to the embedded dataset, not {spec.id!r}")
    if spec.kind == "local":
        params["files"] = local_params(spec)
    if tok.name != "gpt2":  # (absent for GPT-2, so the GPT-2 caches prepared before tokenizers were a choice stay)
        params["tokenizer"] = tok.name

    folder = (Path(cache_dir).expanduser() if cache_dir is not None
              else default_cache_dir(spec, sources, limit, tok.name))
    return built_once(folder, lambda: is_prepared(folder, spec.id, params), lambda: folder,
                      lambda: _build(spec, tok, folder, params, sources, limit, val_fraction, num_proc, hf_cache_dir),
                      force)


def _build(spec: DatasetSpec, tok, folder: Path, params: dict, sources, limit, val_fraction, num_proc,
           hf_cache_dir) -> Path:
    first_use_note(f"preparing {spec.id} ({tok.name} tokens) in {folder} (once; later runs reuse it) ...")
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (folder / META_JSON).unlink()  # the folder is "not done" until the new meta.json lands
    _remove_dead_temps(folder)

    start = time.perf_counter()
    meta = _base_meta(spec, params, tok.name)
    if spec.kind == "embedded":
        split_lengths = None
        if tok.name != "gpt2":
            gpt2 = get_tokenizer("gpt2").encoder(num_proc)

            def split_lengths(texts: list[str]) -> list[int]:
                return [a.size for a in gpt2(texts)]
        meta.update(prepare_embedded(folder, sources, limit, val_fraction, tok.encoder(num_proc), tok.name,
                                     split_lengths))
    else:
        from noble_cli.data.hf_text import prepare_hf

        # the HF/local split hashes the text: it is the same for every tokenizer already
        meta.update(prepare_hf(spec, folder, limit=limit, val_fraction=val_fraction, num_proc=num_proc,
                               hf_cache_dir=hf_cache_dir, tokenizer=tok.name,
                               encode_documents=None if tok.name == "gpt2" else tok.encoder(1)))
    meta["total_tokens"] = meta["train_tokens"] + meta["val_tokens"]
    meta["prepare_seconds"] = round(time.perf_counter() - start, 3)
    meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    atomic_write_json(folder / META_JSON, meta)
    first_use_note(f"prepared {meta['total_tokens']:,} tokens in {meta['prepare_seconds']:.1f}s")
    return folder


def shard_dir(data: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *, build: bool = True,
              tokenizer: str = "gpt2") -> Path:
    """A prepared shard folder for `data` (a shard folder or a dataset argument), preparing it if `build`."""
    spec = resolve_dataset(data)
    if spec.kind == "shards":
        return prepare(data, tokenizer=tokenizer)
    if build:
        return prepare(data, cache_dir, tokenizer=tokenizer)
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(spec, tokenizer=tokenizer)
    if not is_prepared(folder, spec.id, tokenizer=tokenizer):
        flag = "" if tokenizer == "gpt2" else f" --tokenizer {tokenizer}"
        raise NobleError(f"dataset {os.fspath(data)!r} is not prepared in {str(folder)!r}; "
                         f"run: noble data prepare {os.fspath(data)}{flag}")
    return folder


def describe(dataset: str | os.PathLike = "embedded", cache_dir: str | os.PathLike | None = None,
             tokenizer: str = "gpt2") -> dict:
    """What `noble data info` shows: the folder, whether it is prepared, and its token counts (builds nothing)."""
    spec = resolve_dataset(dataset)
    get_tokenizer(tokenizer)  # an unknown name fails here, naming the valid ones
    folder = spec.path if spec.kind == "shards" else (
        Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(spec, tokenizer=tokenizer))
    out: dict = {"dataset": os.fspath(dataset), "id": spec.id, "path": str(folder), "prepared": is_prepared(folder)}
    if not out["prepared"]:
        return out
    meta = read_meta(folder)
    out.update({k: meta.get(k) for k in ("dataset", "tokenizer", "vocab_size", "train_tokens", "val_tokens",
                                         "total_tokens", "documents", "fingerprint", "val_split", "created",
                                         "prepare_seconds")})
    out["dataset"] = os.fspath(dataset)
    out["bytes"] = sum((folder / f"{s}.bin").stat().st_size for s in SPLITS)
    out["sources"] = [{k: s.get(k) for k in ("name", "package", "documents", "tokens", "train_tokens", "val_tokens")}
                      for s in meta.get("sources", [])]
    return out

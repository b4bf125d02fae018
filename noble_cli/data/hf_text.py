"""Real data for online users through Hugging Face `datasets`, written into the same shard format as `embedded`.

`datasets` is imported only inside these functions: the GPU machine has no `datasets`, and importing
`noble_cli.data.*` must work there. Remote datasets (`openwebtext`, `fineweb-edu`, `hf:<name>[:<config>]`) use the
hub; local files use the `text` (one .txt file = one document), `json` (.jsonl/.json, column `text`) and `parquet`
(column `text`) builders and need no network.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from noble_cli.errors import NobleError

TEXT_COLUMN = "text"


def import_datasets():
    try:
        import datasets
    except ImportError:
        raise NobleError("Hugging Face 'datasets' is not installed (needed for HF and local text data); "
                         "run: pip install 'datasets>=3.0', or use the embedded dataset") from None
    return datasets


def is_val_text(text: str, val_buckets: int) -> bool:
    """Document-level split: blake2b(text) falls in the first `val_buckets` of 10,000 buckets."""
    from noble_cli.data.shard_format import VAL_BUCKETS

    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h % VAL_BUCKETS < val_buckets


def _encode_batch(batch: dict, encode_documents, val_buckets: int) -> dict:
    """`datasets.map` function (module level so it pickles into worker processes and hashes stably)."""
    texts = [t or "" for t in batch[TEXT_COLUMN]]
    ids = [a.tolist() for a in encode_documents(texts)]
    return {"ids": ids, "len": [len(d) for d in ids], "val": [is_val_text(t, val_buckets) for t in texts]}


def gpt2_encoder():
    """GPT-2 BPE with `<|endoftext|>` after each document, one thread (`datasets.map` brings the processes)."""
    from noble_cli.data.tokenizer import encode_documents

    return functools.partial(encode_documents, num_threads=1)


def load_text_dataset(spec, *, hf_cache_dir: str | os.PathLike | None = None, num_proc: int | None = None):
    """A `datasets.Dataset` with one `text` column for a resolved hf/local DatasetSpec."""
    datasets = import_datasets()
    cache = os.fspath(hf_cache_dir) if hf_cache_dir is not None else None
    if spec.kind == "hf":
        kwargs = {"split": "train", "cache_dir": cache, "num_proc": num_proc}
        try:
            try:
                ds = datasets.load_dataset(spec.hf_path, spec.hf_config, **kwargs)
            except RuntimeError as e:
                if "scripts are no longer supported" not in str(e):
                    raise
                # datasets >= 4 runs no loading scripts: use the hub's automatic parquet export instead.
                ds = datasets.load_dataset(spec.hf_path, spec.hf_config, revision="refs/convert/parquet", **kwargs)
        except Exception as e:  # hub unreachable, unknown repo or config, ...
            raise NobleError(f"could not load HF dataset {spec.id!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''} (offline? use the embedded dataset)") from e
        parts = [ds]
    elif spec.kind == "local":
        from noble_cli.data.shard_format import LOCAL_SUFFIXES

        by_builder: dict[str, list[str]] = {}
        for p in spec.files:
            by_builder.setdefault(LOCAL_SUFFIXES[p.suffix.lower()], []).append(str(p))
        parts = []
        for builder in sorted(by_builder):
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            try:
                part = datasets.load_dataset(builder, data_files=by_builder[builder], split="train", cache_dir=cache,
                                             **kwargs)
            except Exception as e:
                raise NobleError(f"could not read {builder} files {by_builder[builder][0]!r}...: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            parts.append(part)
    else:
        raise ValueError(f"not an HF or local dataset: {spec}")
    for part in parts:
        if TEXT_COLUMN not in part.column_names:
            raise NobleError(f"dataset {spec.id!r} has no {TEXT_COLUMN!r} column; columns: "
                             f"{', '.join(part.column_names)}")
    parts = [p.select_columns([TEXT_COLUMN]) for p in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _iter_ids(dset, batch_size: int = 4096):
    """The `ids` column as consecutive uint16 chunks (flattened in Arrow, no per-document Python work)."""
    for table in dset.select_columns(["ids"]).with_format("arrow").iter(batch_size=batch_size):
        values = table.column("ids").combine_chunks().flatten()
        yield values.to_numpy(zero_copy_only=False).astype(np.uint16, copy=False)


def _split_tail(chunks, n_head: int):
    """Route a chunk stream: the first `n_head` tokens to `head`, the rest to `tail` (in order)."""
    head, tail, seen = [], [], 0
    for c in chunks:
        if seen + c.size <= n_head:
            head.append(c)
        elif seen >= n_head:
            tail.append(c)
        else:
            head.append(c[: n_head - seen])
            tail.append(c[n_head - seen:])
        seen += c.size
    return head, tail


def prepare_hf(spec, folder: Path, *, limit: int | None, val_fraction: float, num_proc: int | None,
               hf_cache_dir: str | os.PathLike | None, encode_documents=None, tokenizer: str = "gpt2") -> dict:
    """Tokenize an HF/local dataset into `folder`/{train,val}.bin; returns the meta.json fields it owns.

    encode_documents: texts -> one uint16 array per text, each ending in the tokenizer's document separator; it runs
    in `datasets.map` worker processes, so it must pickle (a module-level function or a functools.partial of one).
    Default: GPT-2 BPE + `<|endoftext|>`. tokenizer: the tag that heads the content fingerprint."""
    datasets = import_datasets()
    from noble_cli.data.shard_format import VAL_BUCKETS, Fingerprint, write_split
    from noble_cli.data.tokenizer import default_threads

    ds = load_text_dataset(spec, hf_cache_dir=hf_cache_dir, num_proc=num_proc)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    if len(ds) == 0:
        raise NobleError(f"dataset {spec.id!r} has no documents")
    nproc = num_proc or default_threads()
    nproc = max(1, min(nproc, len(ds) // 1000 or 1))  # worker processes only pay off on larger data
    val_buckets = max(1, round(val_fraction * VAL_BUCKETS))
    list_type = getattr(datasets, "List", None) or datasets.Sequence
    features = datasets.Features({"ids": list_type(datasets.Value("uint16")), "len": datasets.Value("int64"),
                                  "val": datasets.Value("bool")})
    if encode_documents is None:
        encode_documents = gpt2_encoder()
    tok = ds.map(_encode_batch, batched=True, batch_size=256,
                 fn_kwargs={"encode_documents": encode_documents, "val_buckets": val_buckets},
                 remove_columns=ds.column_names, features=features, num_proc=nproc if nproc > 1 else None,
                 desc=f"tokenizing {spec.id}")
    is_val = np.asarray(tok["val"], dtype=bool)
    lengths = np.asarray(tok["len"], dtype=np.int64)
    val_idx = np.flatnonzero(is_val)
    train_idx = np.flatnonzero(~is_val)
    train_ds = tok.select(train_idx) if val_idx.size else tok
    fp = Fingerprint(tokenizer)
    if val_idx.size:
        n_train = write_split(folder, "train", _iter_ids(train_ds), fp)
        n_val = write_split(folder, "val", _iter_ids(tok.select(val_idx)), fp)
        rule = (f"documents whose blake2b(text) falls in the first {val_buckets} of {VAL_BUCKETS} buckets")
        docs = {"train": int(train_idx.size), "val": int(val_idx.size)}
    else:  # tiny data: no document landed in validation, so hold out the end of the token stream
        total = int(lengths.sum())
        n_tail = max(round(val_fraction * total), min(total // 10, 50_000))
        if total < 2 or n_tail < 1:
            raise NobleError(f"dataset {spec.id!r} has too little text ({total} tokens) for a train/val split")
        head, tail = _split_tail(_iter_ids(tok), total - n_tail)
        n_train = write_split(folder, "train", head, fp)
        n_val = write_split(folder, "val", tail, fp)
        rule = (f"no document hashed into val ({val_buckets}/{VAL_BUCKETS} buckets), so the last {n_tail} tokens "
                "of the token stream are val")
        docs = {"train": int(len(tok)), "val": 0}
    name = spec.hf_path if spec.kind == "hf" else ", ".join(p.name for p in spec.files[:5]) + (
        f", ... ({len(spec.files)} files)" if len(spec.files) > 5 else "")
    return {"train_tokens": n_train, "val_tokens": n_val, "fingerprint": fp.hexdigest(), "documents": docs,
            "val_split": rule,
            "sources": [{"name": name, "package": f"datasets=={datasets.__version__}", "documents": int(len(tok)),
                         "tokens": n_train + n_val, "train_tokens": n_train, "val_tokens": n_val}]}

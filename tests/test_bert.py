"""Masked-LM task: WordPiece offline, BERT masking statistics, loss on chosen tokens only, fixed eval masks, NOBLE
placement, and a tiny run whose eval loss falls. Everything runs on a few documents per source, in a temp data root."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from noble_cli.recipes import resolve
from noble_cli.data.mlm import IGNORE_INDEX, Masking, prepare_all
from noble_cli.data.wordpiece import SPECIAL_TOKENS, load_vocab, train_or_load
from noble_cli.errors import NobleError
from noble_cli.layers import NobleLinear, noble_layers
from noble_cli.tasks import masked_lm

LIMIT = 2  # documents per embedded source
VOCAB = 1024
SMALL = {"data.limit": LIMIT, "model.vocab_size": VOCAB}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("noble-data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOBLE_DATA_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def wordpiece(data_root):
    return train_or_load("embedded", VOCAB, limit=LIMIT)


def small_cfg(**overrides):
    return resolve("bert-tiny", {**SMALL, **overrides})


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_wordpiece_offline_encode_decode_and_cache(data_root, wordpiece):
    wp = wordpiece
    assert wp.vocab_size == VOCAB and wp.tokens[:5] == SPECIAL_TOKENS
    assert (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id) == (0, 1, 2, 3, 4)
    text = "The King said unto the people, thou shalt not be afraid."
    ids = wp.encode(text)
    assert ids[0] == wp.cls_id and ids[-1] == wp.sep_id
    assert wp.unk_id not in ids and any(wp.tokens[i].startswith("##") for i in wp.encode("unbelievably"))
    assert wp.decode(ids) == text.lower()
    assert wp.encode(text, add_special_tokens=False) == ids[1:-1]

    vocab_txt = next((data_root / "wordpiece").glob("embedded-v1024-*/vocab.txt"))
    stamp = vocab_txt.stat().st_mtime_ns
    start = time.perf_counter()
    again = train_or_load("embedded", VOCAB, limit=LIMIT)  # from the cache: nothing retrained or rewritten
    assert time.perf_counter() - start < 1.0
    assert again.tokens == wp.tokens and vocab_txt.stat().st_mtime_ns == stamp
    assert json.loads((vocab_txt.parent / "tokenizer.json").read_text())["tokens"] == VOCAB
    assert load_vocab(vocab_txt).tokens == wp.tokens


def test_wordpiece_training_is_deterministic(tmp_path, wordpiece):
    # tokenizers' own WordPieceTrainer gives a different vocabulary on each run; ours must not.
    fresh = train_or_load("embedded", VOCAB, limit=LIMIT, root=tmp_path)
    assert fresh.sha1 == wordpiece.sha1


# --- masking ------------------------------------------------------------------------------------------------------


def test_masking_statistics_and_specials():
    V, pad, cls, sep, mask = 30000, 0, 2, 3, 4
    masking = Masking(mask_id=mask, never_masked=(pad, cls, sep, mask), random_ids=tuple(range(5, V)))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (64, 512), generator=g)
    ids[:, 0], ids[:, -1] = cls, sep
    ids[:, 100:110] = sep
    ids[:8, 300:] = pad
    special = torch.isin(ids, torch.tensor([pad, cls, sep]))
    inputs, labels = masking(ids, torch.Generator().manual_seed(1))

    chosen = labels != IGNORE_INDEX
    assert not (chosen & special).any() and torch.equal(inputs[special], ids[special])
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    frac = chosen.sum().item() / (~special).sum().item()
    assert abs(frac - 0.15) < 0.006, frac
    n = chosen.sum().item()  # ~4,600
    masked = (inputs[chosen] == mask).sum().item() / n
    unchanged = (inputs[chosen] == ids[chosen]).sum().item() / n
    randomized = 1 - masked - unchanged
    assert abs(masked - 0.8) < 0.02 and abs(unchanged - 0.1) < 0.015 and abs(randomized - 0.1) < 0.015
    assert ((inputs[chosen] >= 5) | (inputs[chosen] == mask)).all()  # random replacements are never specials
    again = masking(ids, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


# --- model --------------------------------------------------------------------------------------------------------


def test_loss_only_on_chosen_tokens(wordpiece):
    module = masked_lm.TASK.build_module(small_cfg(**{"model.dropout": 0.0}))
    module.eval()
    ids = torch.randint(5, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = wordpiece.cls_id, wordpiece.sep_id
    inputs, labels = Masking.for_vocab(wordpiece)(ids, torch.Generator().manual_seed(0))
    assert (labels[:, 0] == IGNORE_INDEX).all() and (labels[:, -1] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss, acc = module.masked_lm({"input_ids": inputs, "labels": labels})
        logits = module(inputs)  # (B, T, V)
    assert logits.shape == (4, 32, VOCAB)
    full = F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, full)
    chosen = labels != IGNORE_INDEX
    assert acc == (logits[chosen].argmax(-1) == labels[chosen]).float().mean()
    noisy = logits.clone()
    noisy[~chosen] += 10 * torch.randn_like(noisy[~chosen])  # other positions' logits do not matter
    torch.testing.assert_close(F.cross_entropy(noisy.view(-1, VOCAB), labels.view(-1)), full)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_noble_on_exactly_qkvo_and_ffn(norm):
    cfg = small_cfg(**{"noble.branch": "cosnet", "model.norm": norm, "model.n_layer": 3})
    module = masked_lm.TASK.build_module(cfg)
    names = {name for name, _ in noble_layers(module.model)}
    expected = {f"layers.{i}.{p}" for i in range(3) for p in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.fc",
                                                              "mlp.fc2")}
    assert names == expected
    assert type(module.model.head.transform) is torch.nn.Linear and type(module.model.head.decoder) is torch.nn.Linear
    assert module.model.head.decoder.weight is module.model.embed.tok.weight  # tied
    x = torch.randint(5, VOCAB, (2, 16))
    assert module(x).shape == (2, 16, VOCAB)
    baseline = masked_lm.TASK.build_module(small_cfg(**{"model.norm": norm, "model.n_layer": 3}))
    assert not any(isinstance(m, NobleLinear) for m in baseline.modules())


def test_config_checks():
    with pytest.raises(NobleError, match="model.norm"):
        small_cfg(**{"model.norm": "sandwich"})
    with pytest.raises(NobleError, match="max_position"):
        small_cfg(**{"data.seq_len": 128})
    with pytest.raises(NobleError, match="mask_ratio"):
        small_cfg(**{"data.mask_ratio": 0.95, "data.random_ratio": 0.1})


# --- data ---------------------------------------------------------------------------------------------------------


def test_shards_and_fixed_eval_masks(data_root, wordpiece):
    wp, folder = prepare_all("embedded", VOCAB, limit=LIMIT)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["vocab_sha1"] == wordpiece.sha1 and meta["train_tokens"] > 10_000 and meta["val_tokens"] > 0
    assert prepare_all("embedded", VOCAB, limit=LIMIT)[1] == folder  # cached

    def eval_batches(seed):
        dm = masked_lm.TASK.build_datamodule(small_cfg(seed=seed, **{"trainer.eval_batches": 2}))
        dm.prepare_data()
        dm.setup("fit")
        return list(dm.val_dataloader()), dm

    first, dm = eval_batches(0)
    second, _ = eval_batches(0)
    other_seed, _ = eval_batches(1)
    again = list(dm.val_dataloader())
    for a, b, c in zip(first, second, again):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["input_ids"], c["input_ids"]) and torch.equal(a["labels"], c["labels"])
    assert all(torch.equal(a["labels"], b["labels"]) for a, b in zip(first, other_seed))
    batch = first[0]
    assert batch["input_ids"].shape == (dm.batch_size, 64) and (batch["input_ids"][:, 0] == wp.cls_id).all()
    chosen = batch["labels"] != IGNORE_INDEX
    assert 0.08 < chosen.float().mean() < 0.22

    # Training batches: a pure function of (seed, index), fresh masks at each index.
    train = dm.train_batches()
    b0, b0_again, b1 = train.batch(0), train.batch(0), train.batch(1)
    assert torch.equal(b0["input_ids"], b0_again["input_ids"]) and torch.equal(b0["labels"], b0_again["labels"])
    assert not torch.equal(b0["labels"], b1["labels"])
    assert b0["input_ids"].dtype == torch.long and b0["input_ids"].max() < VOCAB


# --- a tiny run ---------------------------------------------------------------------------------------------------


def test_tiny_run_eval_loss_falls(data_root, tmp_path):
    from noble_cli.train.run import train

    cfg = small_cfg(**{"trainer.max_steps": 40, "trainer.eval_every": 10, "trainer.eval_batches": 2,
                       "trainer.batch_size": 16, "schedule.warmup_steps": 5, "model.n_layer": 1,
                       "noble.branch": "cosnet"})
    result = train(cfg, out=tmp_path, progress=False)
    metrics = pd.read_csv(result.run_dir / "metrics.csv")
    evals = metrics.dropna(subset=["eval_loss"])
    assert list(evals["step"]) == [10, 20, 30, 40]
    assert evals["eval_loss"].iloc[-1] < evals["eval_loss"].iloc[0] - 0.2, evals["eval_loss"].tolist()
    assert {"eval_acc", "tokens_per_s"} <= set(metrics.columns)
    assert evals["eval_acc"].iloc[-1] > 0 and metrics["tokens_per_s"].dropna().gt(0).all()
    assert result.summary["status"] == "completed" and result.meta["params_branch"] > 0

"""`noble sample`: text from a tiny trained causal-LM run; seeds, token counts, greedy decoding, bad runs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import run_noble as cli
from noble_cli import recipes as C
from noble_cli.errors import NobleError
from noble_cli.data.text_tokenizers import get_tokenizer
from noble_cli.layers import noble_layers
from noble_cli.sample import context_length, generate, load_run, sample_text, text_tasks
from noble_cli.tasks import get_task
from noble_cli.train.run import train

TINY = ["model.d_model=32", "model.n_head=2", "model.n_layer=2", "model.block_size=32", "data.seq_len=32",
        "trainer.batch_size=8", "trainer.eval_batches=1", "trainer.max_steps=4", "trainer.eval_every=2",
        "noble.branch=cosnet", "noble.rank=4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A NOBLE GPT trained for a few steps: best.ckpt and last.ckpt."""
    out = tmp_path_factory.mktemp("sample")
    return train(C.resolve("llm-tiny", sets=TINY), out=out, progress=False).run_dir




def test_the_checkpoint_comes_back_with_its_branches(run):
    model, cfg, tok = load_run(run, "last")
    assert cfg.task == "causal_lm" and not model.training and tok.name == "gpt2"
    assert len(noble_layers(model)) == 12 and context_length(model) == 32
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.blocks[0].attn.q.up.weight, state["model.blocks.0.attn.q.up.weight"])


def test_sampling_is_deterministic_for_a_seed_and_honours_tokens(run):
    model, _, tok = load_run(run, "best")
    ids = tok.encode("The king said")
    first = generate(model, ids, 12, temperature=1.0, seed=3, context=32)
    assert first == generate(model, ids, 12, temperature=1.0, seed=3, context=32)
    assert len(first) == 12 and len(generate(model, ids, 5, seed=3, context=32)) == 5
    assert first != generate(model, ids, 12, temperature=1.0, seed=4, context=32)
    text = sample_text(run, "The king said", tokens=12, temperature=1.0, seed=3)
    assert text.startswith("The king said") and text == sample_text(run, "The king said", 12, 1.0, seed=3)


def test_temperature_zero_is_argmax(run):
    model, _, tok = load_run(run, "best")
    ids = tok.encode("Once upon a time")
    greedy = generate(model, ids, 6, temperature=0.0, seed=1, context=32)
    assert greedy == generate(model, ids, 6, temperature=0.0, seed=99, context=32), "no randomness at T=0"
    by_hand = list(ids)
    for _ in range(6):
        by_hand.append(int(model(torch.tensor([by_hand[-32:]]))[0, -1].argmax()))
    assert greedy == by_hand[len(ids):]


class Counter(nn.Module):
    """Not our GPT: a module whose logits favour (last id + 1) mod V, returned as an output with `.logits`
    (transformers' causal LMs) — the loop needs nothing else."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.widths = []

    def forward(self, ids):
        self.widths.append(ids.shape[1])
        logits = nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float() * self.scale
        return type("Out", (), {"logits": logits})()


def test_the_loop_takes_any_module_returning_logits_and_keeps_the_context_window():
    m = Counter()
    assert generate(m, [5], 4, temperature=0.0, context=3) == [6, 0, 1, 2]
    assert m.widths == [1, 2, 3, 3]


def test_the_tokenizer_comes_from_the_run_s_task_and_data_config():
    task = get_task("causal_lm")
    old = C.resolve("llm-tiny").to_dict()
    del old["data"]["tokenizer"]  # runs before data.tokenizer existed: GPT-2 BPE
    tok = task.text_tokenizer(C.from_dict(old))
    assert tok.encode("Hello world") == [15496, 995] and tok.eot_id == 50256
    assert task.text_tokenizer(C.resolve("llm-bytes")).encode("Hé") == [72, 195, 169]
    with pytest.raises(NobleError, match="tokenizer 'klingon'; valid: gpt2, bytes"):
        C.resolve("llm-tiny", sets=["data.tokenizer=klingon"])
    # image codes are not text: the image-token task has no text tokenizer, and noble sample names the ones that do
    assert get_task("image_lm").text_tokenizer(C.resolve("image-lm-tiny")) is None
    assert text_tasks() == ["causal_lm", "hf_causal_lm"]
    assert get_tokenizer("gpt2").eot_id == 50256


def test_cli_prints_text_and_refuses_bad_runs_in_one_line(run, tmp_path, monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "sample", str(run), "--prompt", "The", "--tokens", "5", "--seed", "2",
                       "--checkpoint", "last")
    assert code == 0 and out.rstrip("\n") == sample_text(run, "The", 5, 0.8, "last", 2)

    empty = tmp_path / "no-checkpoints"
    (empty / "checkpoints").mkdir(parents=True)
    vit = tmp_path / "a-vit-run"
    (vit / "checkpoints").mkdir(parents=True)
    torch.save({"hyper_parameters": {"config": C.resolve("vit-tiny").to_dict()}, "state_dict": {}},
               vit / "checkpoints" / "best.ckpt")
    for args, message in (
        ([str(empty)], "best.ckpt does not exist; checkpoints in this run: none"),
        ([str(run), "--checkpoint", "first"], "unknown checkpoint 'first'; valid: best, last"),
        ([str(vit)], "is a 'vit' run; noble sample needs a text language model"),
        ([str(tmp_path / "nowhere")], "does not exist"),
        ([str(run), "--tokens", "0"], "--tokens must be >= 1"),
    ):
        code, out, err = cli(monkeypatch, capsys, "sample", *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err + out

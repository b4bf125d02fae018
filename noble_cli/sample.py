"""`noble sample RUN`: text from a causal-LM run folder, so a user sees what a loss value means.

The generation loop needs only a module that maps token ids (1, T) to logits (1, T, vocab) (or an output with
`.logits`, as transformers' causal LMs return) and the run's tokenizer; nothing in it is specific to our GPT.
The tokenizer is the run's task's (`Task.text_tokenizer`: a causal LM's `data.tokenizer`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import typer
from torch import nn

from noble_cli.errors import NobleError

CHECKPOINTS = ("best", "last")


# --- the run --------------------------------------------------------------------------------------------------------


def checkpoint_path(run: Path, which: str) -> Path:
    if which not in CHECKPOINTS:
        raise NobleError(f"unknown checkpoint {which!r}; valid: {', '.join(CHECKPOINTS)}")
    if not run.is_dir():
        raise NobleError(f"run folder {run} does not exist; give a folder under results/runs/")
    path = run / "checkpoints" / f"{which}.ckpt"
    if not path.is_file():
        present = sorted(p.stem for p in (run / "checkpoints").glob("*.ckpt"))
        raise NobleError(f"{path} does not exist; checkpoints in this run: {', '.join(present) or 'none'}")
    return path


def load_run(run: Path, which: str = "best", device: str = "cpu"):
    """(the run's model in eval mode, its resolved config, its tokenizer) from a checkpoint of a text causal-LM
    run."""
    from noble_cli.data.image_tokens import read_checkpoint
    from noble_cli.recipes import from_dict
    from noble_cli.tasks import get_task

    path = checkpoint_path(run, which)
    ckpt = read_checkpoint(path)
    cfg = from_dict(ckpt["hyper_parameters"]["config"])
    tokenizer = get_task(cfg.task).text_tokenizer(cfg)
    if tokenizer is None:
        raise NobleError(f"{run} is a {cfg.task!r} run; noble sample needs a text language model "
                         f"(task {', '.join(text_tasks())})")
    cfg.noble.kernel = "torch"  # the branch's plain PyTorch form: any device, same parameters
    module = get_task(cfg.task).build_module(cfg)
    module.load_state_dict(ckpt["state_dict"])
    return module.model.to(device).eval(), cfg, tokenizer


def text_tasks() -> list[str]:
    """The registered tasks whose tokens are text (those that name a text tokenizer)."""
    from noble_cli.tasks import TASKS, get_task
    from noble_cli.tasks.spec import Task

    return sorted(name for name in TASKS if type(get_task(name)).text_tokenizer is not Task.text_tokenizer)


def context_length(model: nn.Module) -> int | None:
    """How many positions the model can attend to: our GPT's block_size, a transformers config's limit."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for name in ("block_size", "max_position_embeddings", "n_positions"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


# --- generation -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model: Callable, ids: list[int], tokens: int, temperature: float = 1.0, seed: int = 0,
             context: int | None = None) -> list[int]:
    """`tokens` new ids after `ids`: argmax at temperature 0, else sampled from softmax(logits / temperature) with a
    generator seeded by `seed` (the same seed gives the same text on the same device). The window is the last
    `context` ids."""
    device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    out = list(ids)
    for _ in range(tokens):
        window = torch.tensor([out[-context:] if context else out], device=device)
        logits = model(window)
        logits = getattr(logits, "logits", logits)[0, -1].float()
        if temperature == 0:
            out.append(int(logits.argmax()))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out[len(ids):]


def sample_text(run: Path, prompt: str = "", tokens: int = 100, temperature: float = 0.8,
                checkpoint: str = "best", seed: int = 0) -> str:
    """The prompt followed by `tokens` generated tokens, decoded."""
    if tokens < 1:
        raise NobleError(f"--tokens must be >= 1, got {tokens}")
    if temperature < 0:
        raise NobleError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, tok = load_run(run, checkpoint, device)
    ids = tok.encode(prompt) if prompt else [tok.eot_id]  # the separator the data puts between documents
    new = generate(model, ids, tokens, temperature, seed, context_length(model))
    return prompt + tok.decode(new)


def sample(
    run: Path = typer.Argument(..., help="A causal-LM run folder (results/runs/<run-id>)."),
    prompt: str = typer.Option("", help="Text to continue (default: start of a new document)."),
    tokens: int = typer.Option(100, help="How many tokens to generate."),
    temperature: float = typer.Option(0.8, help="Softmax temperature; 0 = greedy (argmax)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    seed: int = typer.Option(0, help="Sampling seed (same seed, same text)."),
):
    """Print text generated by a causal-LM run's checkpoint."""
    print(sample_text(run, prompt, tokens, temperature, checkpoint, seed))

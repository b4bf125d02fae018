"""Values typed on the command line that hold several items."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def split_list(text: str, sep: str = ",") -> list[str]:
    """`a, b,,c` -> ['a', 'b', 'c']: items separated by `sep`, stripped, empty ones dropped, order kept."""
    return [item.strip() for item in str(text).split(sep) if item.strip()]


def parse_choices(text: str | None, valid: Sequence[str], what: str, *, normalize: Callable[[str], str] = str.lower,
                  aliases: Mapping[str, str] | None = None, skip: Sequence[str] = (),
                  required: str | None = None) -> list[str]:
    """`a,b,a` -> ['a', 'b']: comma-separated choices in the order given, duplicates dropped. Each item is
    normalized, then mapped through `aliases`; values in `skip` (e.g. "none") are accepted and dropped; anything not
    in `valid` is one line naming the valid ones. `required` (the option's name): an empty list is an error."""
    from noble_cli.errors import NobleError, choices_error

    out: list[str] = []
    parts = split_list(text or "")
    if not parts and required:
        raise NobleError(f"{required} is empty; valid: {', '.join(valid)}")
    for part in parts:
        key = normalize(part)
        key = (aliases or {}).get(key, key)
        if key in skip:
            continue
        if key not in valid:
            raise choices_error(what, part, tuple(valid) + tuple(skip))
        if key not in out:
            out.append(key)
    return out

"""Values typed on the command line that hold several items."""

from __future__ import annotations


def split_list(text: str, sep: str = ",") -> list[str]:
    """`a, b,,c` -> ['a', 'b', 'c']: items separated by `sep`, stripped, empty ones dropped, order kept."""
    return [item.strip() for item in str(text).split(sep) if item.strip()]

"""Text held back while streaming: the tail of the output so far that may still grow into a marker."""

from __future__ import annotations

from collections.abc import Iterable


def held_suffix(text: str, markers: Iterable[str]) -> int:
    """How many trailing characters of `text` are the beginning of one of `markers` (a stop string, a
    tool call's start): a stream holds them until the next text decides."""
    markers = [m for m in markers if m]
    for size in range(min(len(text), max((len(m) for m in markers), default=0)), 0, -1):
        tail = text[-size:]
        if any(m.startswith(tail) for m in markers):
            return size
    return 0

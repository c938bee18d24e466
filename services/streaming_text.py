"""Text that streams out piece by piece while a mark (a stop string, a tag) may be in it."""

from __future__ import annotations

from collections.abc import Collection


def held_back(text: str, marks: Collection[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``marks``:
    what a stream holds until the next piece tells whether the mark follows."""
    longest = max(map(len, marks), default=0)
    for n in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-n:]
        if any(mark.startswith(tail) for mark in marks):
            return n
    return 0

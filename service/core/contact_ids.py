"""``IdQueue``: AC contact ids waiting to be read back, oldest first, stored compactly. Pure.

A completed import reports the ids of its contacts, not whose they are; they wait to be read
back a hundred at a time (``service/pipeline/learning.py``), ~100,000 of them during a first
load. As Python strings they cost ~55 bytes each; AC's ids are decimal numbers, kept here as
8-byte integers when every id of a batch is one (else as the strings).

Invariant: ``popleft`` returns the ids given, in order, each exactly as given (an id is kept as
an integer only when ``str(int(id)) == id``).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

_MAX_DIGITS = 18  # below 2**63: an int64 holds it


def _plain(contact_id: str) -> bool:
    """A decimal number that reads back as itself: ASCII digits, no leading zero, no sign."""
    return (
        0 < len(contact_id) <= _MAX_DIGITS
        and contact_id.isascii()
        and contact_id.isdigit()
        and (contact_id == "0" or contact_id[0] != "0")
    )


class IdQueue:
    __slots__ = ("_next", "_numbers", "_strings")

    def __init__(self, ids: Iterable[str]) -> None:
        given = list(ids)
        self._next = 0
        self._numbers: array[int] | None = None
        self._strings: list[str] | None = None
        if all(_plain(i) for i in given):
            self._numbers = array("q", map(int, given))
        else:
            self._strings = given

    def _size(self) -> int:
        store = self._numbers if self._numbers is not None else self._strings
        return len(store) if store is not None else 0

    def __len__(self) -> int:
        return self._size() - self._next

    def __bool__(self) -> bool:
        return len(self) > 0

    def popleft(self) -> str:
        if not self:
            raise IndexError("no contact id left")
        index = self._next
        self._next += 1
        if self._numbers is not None:
            return str(self._numbers[index])
        assert self._strings is not None
        return self._strings[index]

    def clear(self) -> None:
        """Drop every id left (and the memory they held)."""
        self._numbers, self._strings, self._next = None, None, 0

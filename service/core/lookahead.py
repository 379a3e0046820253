"""Which records of a backlog a later record of the same key makes moot. Pure.

A partition's backlog (from its committed offset to the end seen on assignment) is read once
ahead, before any of it is processed, and indexed here: per (email, list), the offset of the
record the coalescer would end up keeping if the whole backlog were pending at once. That is
the last record of the key, unless the staleness guard keeps an earlier one (a record that
occurred more than the tolerance before the one it would replace does not replace it, exactly
as in ``Coalescer.add``). Processing then completes every indexed record *before* that offset
at once, without sending anything: the change the later record makes supersedes it, as it
would have in the coalescer had both been pending together.

Why: a first load or a long outage otherwise goes out in waves of the pending bound. A person
entered in one wave and exited in a later one costs an import, then a read of AC (an import's
subscription is not verified) and an unsubscribe; with the backlog read ahead, AC sees only the
final state of each (email, list): an entry, an exit of someone never subscribed (nothing to
send), or nothing at all.

Invariants:
- ``superseded(key, offset)`` is True only when a record of ``key`` at a *later* offset of the
  same partition was read. That record cannot be committed before its own change settles (the
  commit point stops at the first offset not done), and it will be read again after any crash
  or hand-over, so the record skipped now loses nothing;
- records at or past ``end`` (published after the read) are never superseded;
- a record that could not be indexed (poison, its writer schema unavailable) supersedes
  nothing, and is processed as usual when it is read;
- bounded by the caller: at most ``max_keys`` keys over a replica's partitions (``Backlog.keys``
  says how many), ~85 bytes each; a key is forgotten once its kept record is processed.
"""

from __future__ import annotations

from collections.abc import Hashable

_BIAS = 1 << 63  # occurred_at_ms is an Avro long: biased, it packs below the offset


class Backlog:
    """One partition's backlog, indexed. ``end``: the first offset not read ahead."""

    __slots__ = ("_winner", "end", "records", "tolerance_ms")

    def __init__(self, tolerance_ms: int | None) -> None:
        self.tolerance_ms = tolerance_ms
        # key -> offset << 64 | (occurred_at_ms + 2**63): one int per key, not a tuple.
        self._winner: dict[Hashable, int] = {}
        self.end = 0
        self.records = 0

    @property
    def keys(self) -> int:
        return len(self._winner)

    def read(self, offset: int) -> None:
        """A record at ``offset`` was read (indexed or not): the index covers up to it."""
        self.records += 1
        if offset >= self.end:
            self.end = offset + 1

    def add(self, key: Hashable, offset: int, occurred_at_ms: int) -> None:
        """Index a valid record, in offset order. Call ``read`` for it too."""
        current = self._winner.get(key)
        tolerance = self.tolerance_ms
        if (
            current is not None
            and tolerance is not None
            and occurred_at_ms + tolerance < (current & (_BIAS * 2 - 1)) - _BIAS
        ):
            return  # the staleness guard keeps the earlier record (``Coalescer.add``)
        self._winner[key] = (offset << 64) | (occurred_at_ms + _BIAS)

    def superseded(self, key: Hashable, offset: int) -> bool:
        """Does a later record of ``key``, read ahead, make the record at ``offset`` moot?
        Asked in offset order; once the record kept for ``key`` is asked about, the key is
        forgotten (what follows it in the backlog is processed as usual: the guard folds it)."""
        if offset >= self.end:
            return False
        winner = self._winner.get(key)
        if winner is None:
            return False
        kept = winner >> 64
        if kept == offset:
            del self._winner[key]  # the index shrinks as the backlog is processed
        return kept > offset

    def passed(self, offset: int) -> bool:
        """Has processing reached the last record read ahead (the index can go)?"""
        return offset + 1 >= self.end

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

The index also marks a record whose *email* has a later record in the backlog that will be
processed (``CONTINUES``): its change can wait for that record, and the email's lists leave
in one import row. Records of one partition are read in offset order, but a pause for the
pending bound can fall between an email's records; without the mark the first part left
before the rest was read (5,261 of 93,555 emails imported twice on the 500,000-event load).

Invariants:
- ``CONTINUES`` is only set on a record not superseded, and only when a later record of the
  same email, not superseded either, was indexed (so processing will add it);
- ``superseded(offset)`` is True only when a record of the same key at a *later* offset of the
  same partition was read. That record cannot be committed before its own change settles (the
  commit point stops at the first offset not done), and it will be read again after any crash
  or hand-over, so the record skipped now loses nothing;
- records at or past ``end`` (published after the read) are never superseded;
- a record that could not be indexed (poison, its writer schema unavailable) supersedes
  nothing, and is processed as usual when it is read;
- bounded by the caller while it is read: at most ``max_keys`` keys over a replica's partitions
  (``Backlog.keys`` says how many), ~125 bytes each; sealed, a byte per record read ahead.
"""

from __future__ import annotations

from collections.abc import Hashable

SUPERSEDED = 1  # a later record of the same key supersedes it: nothing is sent for it
# A later record of the same email is processed: its change may wait for it, so that the
# email's lists leave in one import row instead of two (``Coalescer.add(hold=True)``).
CONTINUES = 2

_BIAS = 1 << 63  # occurred_at_ms is an Avro long: biased, it packs below the offset
_MASK = _BIAS * 2 - 1


class Backlog:
    """One partition's backlog, indexed. ``end``: the first offset not read ahead.

    Two forms. While it is read (``add``): per key, the record kept so far, ~125 bytes a key.
    Once sealed (``seal``, or the first ``superseded``): one byte per offset read ahead, set
    for a record a later record of its key supersedes. The keys are forgotten at once, so a
    first load's index (40 MB for 316,000 keys) is gone before its records fill the pending
    bound, and 500,000 records cost 0.5 MB while they are processed.
    """

    __slots__ = (
        "_after",
        "_keys",
        "_marks",
        "_start",
        "_winner",
        "end",
        "records",
        "tolerance_ms",
    )

    def __init__(self, tolerance_ms: int | None) -> None:
        self.tolerance_ms = tolerance_ms
        # key -> offset << 64 | (occurred_at_ms + 2**63): one int per key, not a tuple.
        self._winner: dict[tuple[Hashable, Hashable], int] | None = {}
        # key -> offsets of records the guard did not let replace the one kept so far: they
        # follow the kept record, so nothing later supersedes them unless a newer record
        # replaces it (rare: only events out of order by more than the tolerance).
        self._after: dict[tuple[Hashable, Hashable], list[int]] = {}
        self._marks = bytearray()  # offset - _start -> 1: indexed (sealed: superseded)
        self._start = -1
        self._keys = 0  # keys indexed, once sealed
        self.end = 0
        self.records = 0

    @property
    def keys(self) -> int:
        """Keys indexed (the read-ahead's bound counts them while it reads)."""
        return len(self._winner) if self._winner is not None else self._keys

    @property
    def sealed(self) -> bool:
        return self._winner is None

    def read(self, offset: int) -> None:
        """A record at ``offset`` was read (indexed or not): the index covers up to it."""
        self.records += 1
        if offset >= self.end:
            self.end = offset + 1

    def add(self, key: tuple[Hashable, Hashable], offset: int, occurred_at_ms: int) -> None:
        """Index a valid record, in offset order. Call ``read`` for it too. ``key``: (email,
        list); the email is what ``CONTINUES`` follows."""
        winners = self._winner
        if winners is None:
            raise RuntimeError("the backlog is sealed")
        self._mark(offset)
        current = winners.get(key)
        tolerance = self.tolerance_ms
        if (
            current is not None
            and tolerance is not None
            and occurred_at_ms + tolerance < (current & _MASK) - _BIAS
        ):
            # The staleness guard keeps the earlier record (``Coalescer.add``).
            self._after.setdefault(key, []).append(offset)
            return
        winners[key] = (offset << 64) | (occurred_at_ms + _BIAS)
        if self._after:
            self._after.pop(key, None)  # they now precede the record kept: superseded

    def seal(self) -> None:
        """Forget the keys: keep a byte per offset, ``SUPERSEDED`` where a later record of its
        key supersedes it, ``CONTINUES`` where a later record of its *email* is processed."""
        winners = self._winner
        if winners is None:
            return
        marks, start = self._marks, self._start
        # The offset of each email's last record processed (not superseded): its changes are
        # all read once processing reaches it. Transient: one entry per email, freed here.
        last: dict[Hashable, int] = {}
        for key, packed in winners.items():
            offset = packed >> 64
            last[key[0]] = max(last.get(key[0], offset), offset)
        for key, offsets in self._after.items():  # a key here has its record kept: in ``last``
            last[key[0]] = max(last[key[0]], offsets[-1])
        for key, packed in winners.items():
            offset = packed >> 64  # the record kept: not superseded
            marks[offset - start] = CONTINUES if offset < last[key[0]] else 0
        for key, offsets in self._after.items():
            for offset in offsets:  # after the record kept: processed as usual
                marks[offset - start] = CONTINUES if offset < last[key[0]] else 0
        self._keys = len(winners)
        self._winner, self._after = None, {}

    def superseded(self, offset: int) -> bool:
        """Does a later record of the same key, read ahead, make the record at ``offset``
        moot? (Seals the index.)"""
        return self.mark(offset) == SUPERSEDED

    def mark(self, offset: int) -> int:
        """What the index knows of the record at ``offset``: ``SUPERSEDED``, ``CONTINUES``
        (a later record of its email, read ahead, is processed too), or 0. Seals the index."""
        if self._winner is not None:
            self.seal()
        index = offset - self._start
        return self._marks[index] if 0 <= index < len(self._marks) else 0

    def informs(self) -> bool:
        """Is any record superseded or held for its email's later record (else the index
        changes nothing)? Seals the index."""
        self.seal()
        return SUPERSEDED in self._marks or CONTINUES in self._marks

    def passed(self, offset: int) -> bool:
        """Has processing reached the last record read ahead (the index can go)?"""
        return offset + 1 >= self.end

    def _mark(self, offset: int) -> None:
        if self._start < 0:
            self._start = offset
        index = offset - self._start
        if index < 0:
            raise ValueError(f"offset {offset} is before the first one indexed ({self._start})")
        marks = self._marks
        if index >= len(marks):
            marks.extend(bytes(index + 1 - len(marks)))
        marks[index] = 1

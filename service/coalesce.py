"""One pending state per (partition, email, list). Pure: every method takes ``now``.

Invariants:
- the last event added for a key wins (partition order); the change keeps every source offset it
  covers, so completing it completes the events it superseded;
- a key becomes due ``window`` seconds after its *first* pending event (a hot key cannot starve);
- changes of one email are handed out together, and never while that email is busy elsewhere
  (the caller passes the busy set), so AC never sees two requests for one email at once;
- ``discard`` forgets partitions wholesale (revoke/lost); their offsets are not completed.

The partition is part of the key because ordering is only defined within a partition; producers
key by the normalised email, so in a healthy topic one email lives in one partition.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from service.ledger import ListState, Plan
from service.model import MembershipEvent, SourceOffset


class ListRef(NamedTuple):
    """An AC list: by name (found or created) or by an id given in the mapping file."""

    name: str | None = None
    list_id: str | None = None

    def label(self) -> str:
        return self.name if self.name is not None else f"#{self.list_id}"


ChangeKey = tuple[int, str, ListRef]
EmailKey = tuple[int, str]


@dataclass(slots=True)
class PendingChange:
    partition: int
    email: str
    target: ListRef
    event: MembershipEvent
    raw: bytes | None
    offsets: list[SourceOffset]
    first_seen: float
    due_at: float
    attempts: int = 0
    last_error: str = ""
    seq: int = field(default=0)
    force_single: bool = False  # AC refused it in an import: learn the exact error per contact
    plan: Plan = Plan.SET  # decided from the ledger when the change is handed out
    previous: ListState | None = None  # the ledger's state for the key at that moment
    key: ChangeKey = field(init=False)  # computed once: it is hashed on every dict and heap move

    def __post_init__(self) -> None:
        self.key = (self.partition, self.email, self.target)


class Coalescer:
    def __init__(self, window: float) -> None:
        self.window = window
        self._pending: dict[ChangeKey, PendingChange] = {}
        self._by_email: dict[EmailKey, set[ListRef]] = {}
        self._heap: list[tuple[float, int, ChangeKey]] = []
        self._seq = itertools.count()
        self.superseded_total = 0

    def __len__(self) -> int:
        return len(self._pending)

    def _push(self, change: PendingChange) -> None:
        change.seq = next(self._seq)
        heapq.heappush(self._heap, (change.due_at, change.seq, change.key))

    def _insert(self, change: PendingChange) -> None:
        self._pending[change.key] = change
        email_key = (change.partition, change.email)
        targets = self._by_email.get(email_key)
        if targets is None:
            self._by_email[email_key] = {change.target}
        else:
            targets.add(change.target)
        self._push(change)

    def add(
        self,
        partition: int,
        target: ListRef,
        event: MembershipEvent,
        raw: bytes | None,
        offset: int,
        now: float,
    ) -> bool:
        """Add one event. True when it superseded a pending change for the same key."""
        key = (partition, event.email, target)
        current = self._pending.get(key)
        source = SourceOffset(partition, offset)
        if current is not None:
            current.event = event
            current.raw = raw
            current.offsets.append(source)
            current.attempts = 0
            current.force_single = False
            self.superseded_total += 1
            return True
        self._insert(
            PendingChange(
                partition, event.email, target, event, raw, [source], now, now + self.window
            )
        )
        return False

    def next_due_at(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            _, seq, key = heap[0]
            change = self._pending.get(key)
            if change is not None and change.seq == seq:
                return
            heapq.heappop(heap)

    def take_due(
        self, now: float, *, limit: int, busy: set[str], flush_all: bool = False
    ) -> list[list[PendingChange]]:
        """Remove and return up to ``limit`` groups of due changes, one group per email."""
        groups: list[list[PendingChange]] = []
        deferred: list[tuple[float, int, ChangeKey]] = []
        heap = self._heap
        while heap and len(groups) < limit:
            due_at, seq, key = heap[0]
            change = self._pending.get(key)
            if change is None or change.seq != seq:
                heapq.heappop(heap)
                continue
            if due_at > now and not flush_all:
                break
            heapq.heappop(heap)
            if change.email in busy:
                deferred.append((due_at, seq, key))
                continue
            groups.append(self._take_email(change.partition, change.email))
            busy = busy | {change.email}
        for item in deferred:
            heapq.heappush(heap, item)
        return groups

    def _take_email(self, partition: int, email: str) -> list[PendingChange]:
        targets = self._by_email.pop((partition, email), set())
        return [self._pending.pop((partition, email, t)) for t in targets]

    def requeue(self, change: PendingChange, not_before: float) -> None:
        """Put back a change that must be retried. A newer pending change for the key wins and
        inherits the older offsets (it will supersede what we failed to apply)."""
        newer = self._pending.get(change.key)
        if newer is not None:
            newer.offsets[:0] = change.offsets
            return
        change.due_at = not_before
        self._insert(change)

    def discard(self, partitions: Iterable[int]) -> list[PendingChange]:
        """Forget every pending change of ``partitions``; return what was dropped."""
        gone = set(partitions)
        dropped = [c for k, c in self._pending.items() if k[0] in gone]
        for change in dropped:
            del self._pending[change.key]
            targets = self._by_email.get((change.partition, change.email))
            if targets is not None:
                targets.discard(change.target)
                if not targets:
                    del self._by_email[(change.partition, change.email)]
        return dropped

    def pending(self) -> list[PendingChange]:
        return list(self._pending.values())

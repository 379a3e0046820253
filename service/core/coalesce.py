"""One pending state per (partition, email, list). Pure: every method takes ``now``.

Invariants:
- the last event added for a key wins (partition order), unless it occurred more than the
  staleness tolerance before the event it would replace (then that one stays); the change keeps
  every source offset it covers, so completing it completes the events it superseded;
- a key becomes due ``window`` seconds after its *first* pending event (a hot key cannot starve);
  once its partition is caught up (``expedite``), ``window`` after that event was *published*
  if that is sooner: a backlog is then sent when a consumer that had kept up would have sent it,
  instead of waiting a window after we read it;
- changes of one email are handed out together, and never while that email is busy elsewhere
  (the caller passes the busy set), so AC never sees two requests for one email at once; a due
  change of a busy email waits aside until the caller ``release``s the email (not re-examined on
  every call: a large import keeps thousands of emails busy);
- ``discard`` forgets partitions wholesale (revoke/lost); their offsets are not completed.

The partition is part of the key because ordering is only defined within a partition; producers
key by the normalised email, so in a healthy topic one email lives in one partition.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from service.core.ledger import ListState, Plan
from service.core.model import MembershipEvent


class ListRef(NamedTuple):
    """An AC list: by name (found or created) or by an id given in the mapping file."""

    name: str | None = None
    list_id: str | None = None

    def label(self) -> str:
        return self.name if self.name is not None else f"#{self.list_id}"


ChangeKey = tuple[int, str, ListRef]


@dataclass(slots=True)
class PendingChange:
    partition: int
    email: str
    target: ListRef
    event: MembershipEvent
    raw: bytes | None
    offsets: list[int]  # of ``partition``: every record this change covers, in order
    first_seen: float
    due_at: float
    attempts: int = 0
    seq: int = field(default=0)
    force_single: bool = False  # AC refused it in an import: learn the exact error per contact
    plan: Plan = Plan.SKIP  # decided from the ledger when the change is handed out
    previous: ListState | None = None  # the ledger's state for the key at that moment
    contact_id: str | None = None  # learned by an exit's verification (for its unsubscribe)
    verified_at: float = 0.0  # when the exit's verification read said "still subscribed"
    failing_since: float | None = None  # first failure of the current attempt series
    # The Kafka headers of the record ``raw`` came from (None: it had none): parked with it, so
    # a redriven record that fails again carries its redrive history into the DLQ.
    headers: list[tuple[str, bytes]] | None = None

    @property
    def key(self) -> ChangeKey:
        # Built when asked (requeue, discard: rare), not stored: one object less per pending
        # change, and no __post_init__ call on the per-record path.
        return (self.partition, self.email, self.target)


class Coalescer:
    def __init__(self, window: float, stale_tolerance_ms: int | None = None) -> None:
        self.window = window
        self.stale_tolerance_ms = stale_tolerance_ms
        self.stale_records = 0  # records folded by the staleness guard, ever (a metric)
        self._pending: dict[ChangeKey, PendingChange] = {}
        # email -> the keys of its pending changes (in any partition; usually one). The key
        # tuples themselves, so adding a change builds no other object for this index.
        self._by_email: dict[str, list[ChangeKey]] = {}
        # Due order lives in two queues: new keys arrive with ``now + window`` and ``now`` only
        # grows, so they are already sorted (a deque, O(1)); retries come back at any time (a
        # heap). Entries whose change was taken or superseded are skipped lazily.
        self._fresh: deque[tuple[float, int, ChangeKey]] = deque()
        self._heap: list[tuple[float, int, ChangeKey]] = []
        self._blocked: dict[str, list[tuple[float, int, ChangeKey]]] = {}  # due, email busy
        self._seq = itertools.count()
        self._examined: dict[int, int] = {}  # partition -> last seq ``expedite`` looked at
        self.raw_bytes = 0  # of the records pending changes keep (for the DLQ): back-pressure

    def __len__(self) -> int:
        return len(self._pending)

    def _push(self, change: PendingChange) -> None:
        change.seq = next(self._seq)
        item = (change.due_at, change.seq, change.key)
        fresh = self._fresh
        if not fresh or fresh[-1][0] <= change.due_at:
            fresh.append(item)
        else:
            heapq.heappush(self._heap, item)

    def _live(self, item: tuple[float, int, ChangeKey]) -> bool:
        change = self._pending.get(item[2])
        return change is not None and change.seq == item[1]

    def _head(
        self,
    ) -> deque[tuple[float, int, ChangeKey]] | list[tuple[float, int, ChangeKey]] | None:
        """The queue whose first live entry is due first (stale entries dropped on the way)."""
        fresh, heap = self._fresh, self._heap
        while fresh and not self._live(fresh[0]):
            fresh.popleft()
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if fresh and (not heap or fresh[0] <= heap[0]):
            return fresh
        return heap if heap else None

    def _insert(self, change: PendingChange) -> None:
        key = change.key
        self._pending[key] = change
        if change.raw:
            self.raw_bytes += len(change.raw)
        keys = self._by_email.get(change.email)
        if keys is None:
            self._by_email[change.email] = [key]
        else:
            keys.append(key)
        self._push(change)

    def add(
        self,
        partition: int,
        target: ListRef,
        event: MembershipEvent,
        raw: bytes | None,
        offset: int,
        now: float,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> bool:
        """Add one event. True when it superseded a pending change for the same key.
        ``headers``: the record's own Kafka headers (kept with ``raw`` for the DLQ).

        Runs once per consumed record: ``_insert`` and ``_push`` are written out here, since a
        Python call costs about as much as each of their steps.
        """
        email = event.email
        key = (partition, email, target)
        current = self._pending.get(key)
        if current is not None:
            tolerance = self.stale_tolerance_ms
            if (
                tolerance is not None
                and event.occurred_at_ms + tolerance < current.event.occurred_at_ms
            ):
                # Older than the event it would replace (the staleness guard, as in
                # ``plan_change``): covered, not applied.
                current.offsets.append(offset)
                self.stale_records += 1
                return True
            replaced = current.raw
            if raw is not None and replaced is not None:
                self.raw_bytes += len(raw) - len(replaced)
            else:
                self.raw_bytes += (len(raw) if raw else 0) - (len(replaced) if replaced else 0)
            current.event = event
            current.raw = raw
            current.offsets.append(offset)
            if headers is not None or current.headers is not None:
                current.headers = headers
            # A new event: what was decided for the old one (an exit checked and found still
            # subscribed, a back-off) no longer holds. ``force_single`` stays: AC refused the
            # email in an import, and a new event does not change the email.
            if current.attempts or current.verified_at:
                current.verified_at = 0.0
                current.attempts = 0
                current.failing_since = None
            return True
        due_at = now + self.window
        change = PendingChange(partition, email, target, event, raw, [offset], now, due_at)
        if headers:
            change.headers = headers
        self._pending[key] = change
        if raw:
            self.raw_bytes += len(raw)
        keys = self._by_email.get(email)
        if keys is None:
            self._by_email[email] = [key]
        else:
            keys.append(key)
        seq = change.seq = next(self._seq)
        fresh = self._fresh
        if not fresh or fresh[-1][0] <= due_at:
            fresh.append((due_at, seq, key))
        else:
            heapq.heappush(self._heap, (due_at, seq, key))
        return False

    def next_due_at(self) -> float | None:
        head = self._head()
        return head[0][0] if head else None

    def take_due(
        self, now: float, *, limit: int, busy: Container[str], flush_all: bool = False
    ) -> list[list[PendingChange]]:
        """Remove and return up to ``limit`` groups of due changes, one group per email."""
        groups: list[list[PendingChange]] = []
        deferred: list[tuple[float, int, ChangeKey]] = []
        taken: set[str] = set()
        while len(groups) < limit:
            head = self._head()
            if head is None:
                break
            due_at, seq, key = head[0]
            if due_at > now and not flush_all:
                break
            if head is self._heap:
                heapq.heappop(self._heap)
            else:
                self._fresh.popleft()
            change = self._pending[key]
            if change.email in busy:
                self._blocked.setdefault(change.email, []).append((due_at, seq, key))
                continue
            if change.email in taken:  # the same email in another partition: next call
                deferred.append((due_at, seq, key))
                continue
            groups.append(self._take_email(change.partition, change.email))
            taken.add(change.email)
        for item in deferred:
            heapq.heappush(self._heap, item)
        return groups

    def expedite(
        self,
        partition: int,
        now: float,
        wall: float,
        published: Callable[[int], float | None],
    ) -> int:
        """``partition`` is caught up: every record published to it so far has been added.

        A new change of that partition whose first record was published at ``t`` (wall clock,
        from ``published(offset)``, an upper bound; None: unknown) becomes due at
        ``t + window``, if that is sooner than a window after we read it, and not before
        ``now``: the records a consumer that had kept up would have merged into it are all
        here. Looks only at changes added since the partition's previous call (cost amortised
        over the additions). Returns how many changes were moved forward.
        """
        fresh = self._fresh
        if not fresh:
            return 0
        since = self._examined.get(partition, -1)
        self._examined[partition] = fresh[-1][1]
        sooner: list[PendingChange] = []
        for due_at, seq, key in reversed(fresh):
            if seq <= since:
                break
            if key[0] != partition:
                continue
            change = self._pending.get(key)
            if change is None or change.seq != seq or change.attempts:
                continue
            first = published(change.offsets[0])
            if first is None:
                continue
            due = max(now, now + first + self.window - wall)
            if due < due_at:
                change.due_at = due
                sooner.append(change)
        for change in sooner:
            self._push(change)  # a new seq: the old queue entry goes stale
        return len(sooner)

    def release(self, email: str) -> None:
        """The email is no longer busy: its due changes set aside by ``take_due`` queue again."""
        for item in self._blocked.pop(email, ()):
            if self._live(item):
                heapq.heappush(self._heap, item)

    def _take_email(self, partition: int, email: str) -> list[PendingChange]:
        keys = self._by_email.pop(email, [])
        elsewhere = [key for key in keys if key[0] != partition]  # rare: a mis-keyed producer
        if elsewhere:
            self._by_email[email] = elsewhere
        taken = [self._pending.pop(key) for key in keys if key[0] == partition]
        self.raw_bytes -= sum(len(c.raw) for c in taken if c.raw)
        return taken

    def requeue(self, change: PendingChange, not_before: float) -> None:
        """Put back a change that must be retried. A newer pending change for the key wins and
        inherits the older offsets (it will supersede what we failed to apply), unless it is
        stale beside it (the staleness guard)."""
        key = change.key
        newer = self._pending.get(key)
        if newer is not None:
            tolerance = self.stale_tolerance_ms
            if (
                tolerance is None
                or newer.event.occurred_at_ms + tolerance >= change.event.occurred_at_ms
            ):
                newer.offsets[:0] = change.offsets
                newer.force_single = newer.force_single or change.force_single
                return
            # The pending one is stale beside the change that failed (the guard, as in
            # ``add``): the failed change stays, covering the stale one's records.
            self.stale_records += 1
            change.offsets.extend(newer.offsets)
            change.force_single = change.force_single or newer.force_single
            del self._pending[key]
            if newer.raw:
                self.raw_bytes -= len(newer.raw)
            keys = self._by_email[change.email]
            keys.remove(key)
            if not keys:
                del self._by_email[change.email]
        change.due_at = not_before
        self._insert(change)

    def discard(self, partitions: Iterable[int]) -> list[PendingChange]:
        """Forget every pending change of ``partitions``; return what was dropped."""
        gone = set(partitions)
        dropped = [c for k, c in self._pending.items() if k[0] in gone]
        for change in dropped:
            del self._pending[change.key]
            if change.raw:
                self.raw_bytes -= len(change.raw)
        for email in {change.email for change in dropped}:
            kept = [key for key in self._by_email.pop(email, ()) if key[0] not in gone]
            if kept:
                self._by_email[email] = kept
        return dropped

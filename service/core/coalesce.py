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
        # email -> the key of its pending change, or a list of keys when it has several (in
        # any partition). The key tuples themselves, and a list only for the second key: this
        # index builds no object per change (~57 bytes each at 100,000 pending changes).
        self._by_email: dict[str, ChangeKey | list[ChangeKey]] = {}
        # Due order lives in two queues: new keys arrive with ``now + window`` and ``now`` only
        # grows, so they are already sorted (a deque, O(1)); retries come back at any time (a
        # heap). Entries whose change was taken or superseded are skipped lazily. The sorted
        # queue is two parallel deques (the key, the seq it was queued with) rather than one of
        # (due, seq, key) tuples: a tuple per pending change is ~71 bytes, and the key is the
        # one ``_pending`` holds. An entry is live while its key's pending change has that seq
        # (its ``due_at`` is then the one queued). Not the change itself: a dead entry would
        # keep a change taken long ago (its event, its record) alive until the head reached it.
        self._fresh: deque[ChangeKey] = deque()
        self._fresh_seqs: deque[int] = deque()
        self._fresh_last_due = float("-inf")  # the due of the last entry appended
        self._heap: list[tuple[float, int, ChangeKey]] = []
        self._blocked: dict[str, list[tuple[float, int, ChangeKey]]] = {}  # due, email busy
        self._seq = itertools.count()
        self._examined: dict[int, int] = {}  # partition -> last seq ``expedite`` looked at
        self.raw_bytes = 0  # of the records pending changes keep (for the DLQ): back-pressure

    def __len__(self) -> int:
        return len(self._pending)

    def _push(self, change: PendingChange, key: ChangeKey) -> None:
        """Queue ``change`` by its ``due_at`` under a new seq (its older entries go stale).
        ``key``: the one ``_pending`` holds (not a new tuple per entry)."""
        seq = change.seq = next(self._seq)
        if change.due_at >= self._fresh_last_due or not self._fresh:
            self._fresh.append(key)
            self._fresh_seqs.append(seq)
            self._fresh_last_due = change.due_at
        else:
            heapq.heappush(self._heap, (change.due_at, seq, key))

    def _live(self, item: tuple[float, int, ChangeKey]) -> bool:
        return self._queued(item[2], item[1])

    def _queued(self, key: ChangeKey, seq: int) -> bool:
        change = self._pending.get(key)
        return change is not None and change.seq == seq

    def _head(self) -> tuple[float, int, ChangeKey, bool] | None:
        """The first live entry of the queue due first (stale entries dropped on the way):
        (due, seq, key, whether it is the sorted queue's)."""
        fresh, seqs, heap = self._fresh, self._fresh_seqs, self._heap
        while fresh and not self._queued(fresh[0], seqs[0]):
            fresh.popleft()
            seqs.popleft()
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if fresh:
            key = fresh[0]
            item = (self._pending[key].due_at, seqs[0], key)
            if not heap or item <= heap[0]:
                return (*item, True)
        if heap:
            return (*heap[0], False)
        return None

    def _index_email(self, email: str, key: ChangeKey) -> None:
        keys = self._by_email.get(email)
        if keys is None:
            self._by_email[email] = key
        elif isinstance(keys, list):
            keys.append(key)
        else:
            self._by_email[email] = [keys, key]

    def _email_keys(self, email: str) -> list[ChangeKey]:
        keys = self._by_email.pop(email, None)
        if keys is None:
            return []
        return keys if isinstance(keys, list) else [keys]

    def _reindex_email(self, email: str, keys: list[ChangeKey]) -> None:
        if len(keys) > 1:
            self._by_email[email] = keys
        elif keys:
            self._by_email[email] = keys[0]

    def _insert(self, change: PendingChange) -> None:
        key = change.key
        self._pending[key] = change
        if change.raw:
            self.raw_bytes += len(change.raw)
        self._index_email(change.email, key)
        self._push(change, key)

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
            self._by_email[email] = key
        elif isinstance(keys, list):
            keys.append(key)
        else:
            self._by_email[email] = [keys, key]
        seq = change.seq = next(self._seq)
        if due_at >= self._fresh_last_due or not self._fresh:
            self._fresh.append(key)
            self._fresh_seqs.append(seq)
            self._fresh_last_due = due_at
        else:
            heapq.heappush(self._heap, (due_at, seq, key))
        return False

    def next_due_at(self) -> float | None:
        head = self._head()
        return head[0] if head else None

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
            due_at, seq, key, fresh = head
            if due_at > now and not flush_all:
                break
            if fresh:
                self._fresh.popleft()
                self._fresh_seqs.popleft()
            else:
                heapq.heappop(self._heap)
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
        fresh, seqs = self._fresh, self._fresh_seqs
        if not fresh:
            return 0
        since = self._examined.get(partition, -1)
        self._examined[partition] = seqs[-1]
        # With the key ``_pending`` holds: a caught-up backlog moves up to the whole pending
        # bound at once, and a new key tuple for each was ~64 bytes x 100,000.
        sooner: list[tuple[PendingChange, ChangeKey]] = []
        for key, seq in zip(reversed(fresh), reversed(seqs), strict=True):
            if seq <= since:
                break
            if key[0] != partition:
                continue
            change = self._pending.get(key)
            if change is None or change.seq != seq or change.attempts:
                continue
            due_at = change.due_at
            first = published(change.offsets[0])
            if first is None:
                continue
            due = max(now, now + first + self.window - wall)
            if due < due_at:
                change.due_at = due
                sooner.append((change, key))
        for change, key in sooner:
            self._push(change, key)  # a new seq: the old queue entry goes stale
        return len(sooner)

    def release(self, email: str) -> None:
        """The email is no longer busy: its due changes set aside by ``take_due`` queue again."""
        for item in self._blocked.pop(email, ()):
            if self._live(item):
                heapq.heappush(self._heap, item)

    def _take_email(self, partition: int, email: str) -> list[PendingChange]:
        keys = self._email_keys(email)
        elsewhere = [key for key in keys if key[0] != partition]  # rare: a mis-keyed producer
        self._reindex_email(email, elsewhere)
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
            keys = self._email_keys(change.email)
            keys.remove(key)
            self._reindex_email(change.email, keys)
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
            kept = [key for key in self._email_keys(email) if key[0] not in gone]
            self._reindex_email(email, kept)
        return dropped

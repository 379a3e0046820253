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
- ``discard`` forgets partitions wholesale (revoke/lost); their offsets are not completed;
- a change added with ``hold`` (a later record of its email is on its way: the backlog read
  ahead says so) is pending but not queued: it leaves with the email's next change that is
  queued, when a record of the email is added without ``hold``, or when the caller releases
  the partition's holds (``release_holds``: its records stopped flowing). So an email's lists
  leave in one import row instead of one per wave of the pending bound. ``take_due`` with
  ``flush_all`` releases every hold first.

The partition is part of the key because ordering is only defined within a partition; producers
key by the normalised email, so in a healthy topic one email lives in one partition.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Container, Iterable

from service.core.model import MembershipEvent
from service.core.pending import ChangeKey, ListRef, PendingChange

__all__ = ["HELD", "ChangeKey", "Coalescer", "ListRef", "PendingChange"]

HELD = -1  # the seq of a change added with ``hold``: in no queue


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
        # partition -> emails with a change added with ``hold`` and not yet released. Empty
        # outside a backlog read ahead, so the per-record check costs one truth test.
        self._held: dict[int, set[str]] = {}
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
        *,
        hold: bool = False,
    ) -> bool:
        """Add one event. True when it superseded a pending change for the same key.
        ``headers``: the record's own Kafka headers (kept with ``raw`` for the DLQ). ``hold``:
        a later record of the same email is on its way; a new change then waits for it
        (see the module's invariants). Without ``hold``, the email's held changes queue again.

        Runs once per consumed record: ``_insert`` and ``_push`` are written out here, since a
        Python call costs about as much as each of their steps.
        """
        email = event.email
        if not hold and self._held:
            held = self._held.get(partition)
            if held is not None and email in held:
                self._release(partition, email)
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
        if hold:
            change.seq = HELD
            self._held.setdefault(partition, set()).add(email)
            return False
        seq = change.seq = next(self._seq)
        if due_at >= self._fresh_last_due or not self._fresh:
            self._fresh.append(key)
            self._fresh_seqs.append(seq)
            self._fresh_last_due = due_at
        else:
            heapq.heappush(self._heap, (due_at, seq, key))
        return False

    def _release(self, partition: int, email: str) -> None:
        """Queue the email's held changes of ``partition`` by the due they were added with."""
        held = self._held[partition]
        held.discard(email)
        if not held:
            del self._held[partition]
        keys = self._email_keys(email)
        self._reindex_email(email, keys)
        for key in keys:
            change = self._pending[key]
            if key[0] == partition and change.seq == HELD:
                self._push(change, key)

    def release_holds(self, partition: int | None = None) -> int:
        """Queue every held change of ``partition`` (None: of every partition): its records
        stopped flowing, or its backlog was all read. Returns how many emails were released."""
        partitions = list(self._held) if partition is None else [partition]
        released = 0
        for p in partitions:
            for email in list(self._held.get(p, ())):
                self._release(p, email)
                released += 1
        return released

    def held_partitions(self) -> list[int]:
        """Partitions with a held change."""
        return list(self._held)

    def next_due_at(self) -> float | None:
        head = self._head()
        return head[0] if head else None

    def take_due(
        self, now: float, *, limit: int, busy: Container[str], flush_all: bool = False
    ) -> list[list[PendingChange]]:
        """Remove and return up to ``limit`` groups of due changes, one group per email."""
        if flush_all and self._held:
            self.release_holds()
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
        held = self._held.get(partition)
        if held is not None and email in held:  # its held changes leave with this one
            held.discard(email)
            if not held:
                del self._held[partition]
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
        for partition in gone:
            self._held.pop(partition, None)
        dropped = [c for k, c in self._pending.items() if k[0] in gone]
        for change in dropped:
            del self._pending[change.key]
            if change.raw:
                self.raw_bytes -= len(change.raw)
        for email in {change.email for change in dropped}:
            kept = [key for key in self._email_keys(email) if key[0] not in gone]
            self._reindex_email(email, kept)
        return dropped

"""The account-wide request budget: a leaky bucket with no burst, and the transport that obeys it.

``LeakyBucket`` is pure arithmetic over ``now``: requests leave one every ``interval`` seconds,
never two closer together, and none before a Retry-After pause ends. ActiveCampaign documents
5 requests per second per account and no burst, so the bucket holds exactly one request.

``interval = 1/rate + guard``: the guard (default 10 ms) absorbs scheduling and network jitter
between the moment we send and the moment AC counts the request, so that no one-second window at
AC's side ever holds more than ``rate`` requests.

**One budget per account across replicas.** ``share(owned, total)`` switches the bucket to
wall-clock-aligned ticks of ``interval`` seconds; tick ``k`` belongs to partition ``k mod total``
and a replica may only start a request in a tick of a partition it owns. Kafka gives each
partition to exactly one group member, so at most one request starts per tick account-wide (no
one-second window holds more than ``rate``), and each replica's share is proportional to the
partitions it owns, re-balanced with the partitions. The cost: replicas need clocks within tens
of milliseconds of each other (NTP), and a replica's unused ticks are not lent to the others.

``RateLimiter`` is the thread-safe shell: workers call ``acquire()`` and wait their turn (bulk
imports first, see ``RateLimiter``).
``RateLimitedTransport`` wraps any httpx transport so that no request, retries and lookups
included, can bypass the budget.
"""

from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence

import httpx


class LeakyBucket:
    """Pure arithmetic. Invariant: two granted slots are at least ``interval`` apart."""

    def __init__(self, rate: float, guard: float = 0.01) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.guard = guard
        self.interval = 1.0 / rate + guard
        self.next_free = float("-inf")
        self.paused_until = float("-inf")
        self.pause_epoch = 0
        self.owned: frozenset[int] | None = None  # None: the whole budget is ours
        self.total = 0

    @property
    def rate(self) -> float:
        return 1.0 / self.interval

    def set_rate(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate + self.guard

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        """Own only the ticks of ``owned`` partitions out of ``total`` (None: all ticks)."""
        self.owned = owned if owned is not None and total > 0 else None
        self.total = total

    @property
    def share_ratio(self) -> float:
        if self.owned is None:
            return 1.0
        return len(self.owned) / self.total

    def peek(self, now: float) -> float:
        """When the next slot would start, without booking it."""
        start = max(now, self.next_free, self.paused_until)
        if self.owned is not None:
            start = self._next_owned_tick(start)
        return start

    def reserve(self, now: float) -> float:
        """Book the next free slot; return when it starts (``>= now``)."""
        start = self.peek(now)
        self.next_free = start + self.interval
        return start

    @property
    def tolerance(self) -> float:
        """How late a send may leave and still use its slot: half the slack the guard buys.
        Slots are ``interval = 1/rate + guard`` apart, so ``rate + 1`` sends span at least
        ``1 + rate * guard`` seconds; sends up to ``tolerance`` late (whichever replica makes
        them) still leave half of that beyond one second for the network's jitter. (Without a
        guard there is no slack to share: every send keeps its slot.)"""
        if self.guard <= 0:
            return float("inf")
        return self.rate_nominal * self.guard / 2

    @property
    def rate_nominal(self) -> float:
        return 1.0 / (self.interval - self.guard)

    def on_time(self, start: float, now: float) -> bool:
        """May the slot that started at ``start`` still be used at ``now``? Later than
        ``tolerance`` (a thread woken late), it is void: book the next one instead. Pushing
        every later slot back instead would skip a wall-clock tick after each late wake-up."""
        return now - start <= self.tolerance + 1e-9

    def _next_owned_tick(self, earliest: float) -> float:
        assert self.owned is not None
        if not self.owned:
            # Nothing assigned: one partition's share, so lookups and probes still trickle.
            return earliest + self.interval * (self.total - 1)
        # Tolerance in ticks, not seconds: at wall-clock magnitudes (~1.8e9 s) ``k * interval /
        # interval`` is off by up to ~1e-6, and a 1e-9 tolerance skipped a quarter of all ticks.
        tick = math.ceil(earliest / self.interval - 1e-6)
        for step in range(self.total):
            if (tick + step) % self.total in self.owned:
                return (tick + step) * self.interval
        raise AssertionError("unreachable: owned is not empty")

    def pause(self, until: float) -> None:
        """No slot may start before ``until`` (a 429's Retry-After). Slots already booked are void."""
        if until > self.paused_until:
            self.paused_until = until
            self.next_free = max(self.next_free, until)
            self.pause_epoch += 1

    def paused(self, now: float) -> bool:
        return now < self.paused_until


class LimiterClosed(Exception):
    """The limiter was closed (shutdown) while a request waited for a slot."""


class RateLimiter:
    """Thread-safe shell around ``LeakyBucket`` with an injectable clock.

    Waiters queue for the next slot; one at a time books it and sleeps until it starts (so a
    slot is never lost to a late wake-up). ``urgent`` waiters go ahead of every normal one that
    has not booked yet: bulk imports, because AC allows only 100 a minute and an import that
    waits behind reads for its request slot holds a worker past the next import tick.
    """

    def __init__(
        self,
        rate: float,
        *,
        guard: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._bucket = LeakyBucket(rate, guard)
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        self._queue: list[tuple[int, int]] = []  # (0 urgent / 1 normal, arrival): not booked yet
        self._tickets = itertools.count()
        self._booked = False  # a waiter holds the next slot and sleeps until it starts
        self._closed = False
        self._clock = clock
        self._on_wait = on_wait
        self.waiting = 0

    @property
    def rate(self) -> float:
        """This replica's effective request rate (its share of the account budget)."""
        return self._bucket.rate * self._bucket.share_ratio

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        with self._lock:
            self._bucket.share(owned, total)

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self._bucket.set_rate(rate)

    def pause_for(self, seconds: float) -> None:
        with self._turn:
            self._bucket.pause(self._clock() + seconds)
            self._turn.notify_all()  # the booked slot is void: its holder books again

    def quiesce(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Before the process stops every thread for a while (a garbage collection holds the
        GIL): hold new slots for ``2 * seconds`` and give the requests already allowed
        ``seconds`` to leave. One allowed just before the stop would otherwise leave during it,
        late, bunched with the slots after it (AC's log then counts 6 in one second). The stop
        must begin before the hold ends; a waiter whose slot passes during the stop wakes late
        and gives the slot up (``LeakyBucket.on_time``)."""
        self.pause_for(2 * seconds)
        sleep(seconds)

    def paused(self) -> bool:
        with self._lock:
            return self._bucket.paused(self._clock())

    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._bucket.paused_until - self._clock())

    def close(self) -> None:
        with self._turn:
            self._closed = True
            self._turn.notify_all()

    def acquire(self, *, urgent: bool = False) -> float:
        """Block until this caller may send one request; return the seconds waited."""
        began = self._clock()
        with self._turn:
            ticket = (0 if urgent else 1, next(self._tickets))
            heapq.heappush(self._queue, ticket)
            self.waiting += 1
            try:
                while self._booked or self._queue[0] != ticket:
                    if self._closed:
                        raise LimiterClosed()
                    self._turn.wait()
                heapq.heappop(self._queue)
                self._booked = True
                try:
                    self._sleep_until_slot()
                finally:
                    self._booked = False
                    self._turn.notify_all()
            finally:
                if ticket in self._queue:  # closed while queued
                    self._queue.remove(ticket)
                    heapq.heapify(self._queue)
                self.waiting -= 1
        waited = self._clock() - began
        if self._on_wait is not None:
            self._on_wait(waited)
        return waited

    def _sleep_until_slot(self) -> None:
        """Book the next slot and sleep until it starts (lock held, released while waiting).
        A 429 that arrives meanwhile voids the slot: book a new one after its pause."""
        while True:
            start = self._bucket.reserve(self._clock())
            epoch = self._bucket.pause_epoch
            while not self._closed and self._bucket.pause_epoch == epoch:
                now = self._clock()
                left = start - now
                if left <= 0:
                    if self._bucket.on_time(start, now):
                        return
                    break  # woken too late: the slot is void, the outer loop books the next
                self._turn.wait(left)
            if self._closed:
                raise LimiterClosed()


class ImportBudget:
    """Pure: may an import be sent now? AC allows 100 multi-contact imports in any 60 s.

    The budget is a sliding window, so a backlog after a quiet minute goes out as fast as the
    request budget allows (a burst of up to ``per_minute``), and a long one at ``per_minute`` a
    minute. What makes a burst safe across replicas, rebalances and restarts is that the
    window's history is kept **per partition** and moves with the partition:

    - one import costs ``total`` units; each of the ``total`` partitions holds ``per_minute``
      (less a margin of 2) units per window. Whatever the assignment, the units all partitions
      spend in any window add up to at most ``per_minute`` imports account-wide;
    - a replica pools the units of the partitions it owns (an import's contacts may come from
      any of them) and charges each import to the owned partitions with the most units left;
    - a partition's charges of the last window are written to the partition's ledger
      (``history``) on every charge, and read back by its next owner (``adopt``) before the
      partition may be charged again. Until adopted a partition lends nothing;
    - a charge counts from when the import is taken until ``settle`` records when its request
      returned: AC counted it on arrival, which is no later than that. Until settled (or if a
      revoked owner could not settle it) it is dated ``in_flight`` seconds ahead, longer than
      a request can be on the wire. ``skew`` covers clocks between replicas (NTP).

    Invariant (property-tested with transfers between replicas): at any arrival time, at most
    ``per_minute`` imports arrived in the preceding 60 s. A history lost in a crash between a
    charge and its write can let a new owner overrun; AC then answers "Rate limit exceeded.",
    which pauses imports (back-pressure, nothing lost).
    """

    def __init__(
        self,
        per_minute: int = 100,
        *,
        margin: int = 2,
        window: float = 60.0,
        skew: float = 0.5,
        in_flight: float = 60.0,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        # A margin below AC's figure: AC's window edge and ours need not agree to the millisecond.
        self.per_minute = max(1, per_minute - margin)
        self.window = window + skew
        self.in_flight = in_flight
        self.owned: frozenset[int] | None = None  # None: one pool, the whole budget is ours
        self.total = 1
        self.paused_until = float("-inf")
        self._adopted: set[int] = set()
        self._history: dict[int, list[list[float]]] = {POOL: []}  # partition -> [[time, units, id]]
        self._ids = itertools.count(1)

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        """Own the units of ``owned`` out of ``total`` partitions (None: one pool of all)."""
        if owned is None or total <= 0:
            self.owned, self.total = None, 1
            self._adopted.add(POOL)
            self._history.setdefault(POOL, [])
        else:
            self.owned, self.total = owned, total
            self._adopted.discard(POOL)
            self._history.pop(POOL, None)
        for partition in list(self._history):
            if partition != POOL and (self.owned is None or partition not in self.owned):
                self._history.pop(partition)
                self._adopted.discard(partition)

    def adopt(self, partition: int, charges: Sequence[tuple[float, float]]) -> None:
        """The partition's history as its previous owner wrote it: (time, imports) pairs."""
        self._history[partition] = [
            [at, float(math.ceil(imports * self.total - 1e-9)), 0.0] for at, imports in charges
        ]
        self._adopted.add(partition)

    def history(self, partition: int, now: float) -> list[tuple[float, float]]:
        """The partition's live charges as (time, imports), for its next owner."""
        return [(at, units / self.total) for at, units, _ in self._live(partition, now)]

    @property
    def capacity(self) -> int:
        """Imports this replica may start per minute (at most)."""
        if self.owned is None:
            return self.per_minute
        return self.per_minute * len(self.owned) // self.total

    def _pools(self) -> list[int]:
        if self.owned is None:
            return [POOL]
        return [p for p in self.owned if p in self._adopted]

    def _live(self, partition: int, now: float) -> list[list[float]]:
        history = self._history.get(partition, [])
        live = [charge for charge in history if charge[0] > now - self.window]
        if len(live) != len(history):
            self._history[partition] = live
        return live

    def _left(self, partition: int, now: float) -> float:
        return self.per_minute - sum(charge[1] for charge in self._live(partition, now))

    def left(self, now: float) -> float:
        """Imports the owned partitions could still pay for now (a pause aside)."""
        return sum(max(0.0, self._left(p, now)) for p in self._pools()) / self.total

    def available(self, now: float) -> bool:
        """True when the owned partitions have an import's units left (and no pause is on)."""
        if now < self.paused_until:
            return False
        return sum(self._left(p, now) for p in self._pools()) >= self.total - 1e-9

    def take(self, now: float) -> tuple[int, list[int]]:
        """Charge one import (the caller checked ``available``; an extra request AC counted is
        charged even when nothing is left). Returns the charge's id and the partitions charged."""
        charge_id = next(self._ids)
        due = float(self.total)
        pools = sorted(self._pools(), key=lambda p: (-self._left(p, now), p))
        charged: list[int] = []
        for partition in pools:
            units = min(due, max(0.0, self._left(partition, now)))
            if units <= 0:
                break
            self._history[partition].append([now + self.in_flight, units, float(charge_id)])
            charged.append(partition)
            due -= units
            if due <= 0:
                break
        if due > 0 and pools:  # nothing left: charge the overrun too (AC counted it)
            self._history[pools[0]].append([now + self.in_flight, due, float(charge_id)])
            charged.append(pools[0])
        return charge_id, sorted(set(charged))

    def settle(self, charge_id: int, at: float) -> list[int]:
        """The import's request returned at ``at``: AC counted it by then. Returns the
        partitions whose history changed."""
        changed: list[int] = []
        for partition, history in self._history.items():
            for charge in history:
                if charge[2] == charge_id:
                    charge[0] = at
                    changed.append(partition)
        return changed

    def pause(self, until: float) -> None:
        """AC answered "Rate limit exceeded.": no import until ``until``."""
        self.paused_until = max(self.paused_until, until)


POOL = -1  # the history key when the budget is not shared by partitions


def parse_retry_after(value: str | None, default: float) -> float:
    """Retry-After in seconds (AC sends whole seconds); an HTTP date is also accepted."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


URGENT = "ac_sync_urgent"  # request extension: this request goes ahead of normal waiters


class RateLimitedTransport(httpx.BaseTransport):
    """Every request waits for a slot; a 429 pauses every other request for its Retry-After.
    A request sent with ``extensions={URGENT: True}`` is served before normal waiters."""

    def __init__(
        self, inner: httpx.BaseTransport, limiter: RateLimiter, default_retry_after: float = 5.0
    ) -> None:
        self._inner = inner
        self._limiter = limiter
        self._default_retry_after = default_retry_after

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self._limiter.acquire(urgent=bool(request.extensions.get(URGENT)))
        response = self._inner.handle_request(request)
        if response.status_code == 429:
            retry_after = parse_retry_after(
                response.headers.get("Retry-After"), self._default_retry_after
            )
            self._limiter.pause_for(retry_after)
        return response

    def close(self) -> None:
        self._inner.close()

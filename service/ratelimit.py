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
from collections.abc import Callable

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

    def sent(self, now: float) -> None:
        """The booked slot was used at ``now``, possibly later than it started (a thread woken
        late). Up to ``guard`` late changes nothing (the guard is there for that); later, the
        next slot starts no sooner than ``1/rate`` after the actual send, so late wake-ups never
        bunch two requests closer than AC's limit allows. (Not a full ``interval``: with
        wall-clock ticks every wake-up a millisecond late would then skip a whole tick.)"""
        self.next_free = max(self.next_free, now + self.interval - self.guard)

    def _next_owned_tick(self, earliest: float) -> float:
        assert self.owned is not None
        if not self.owned:
            # Nothing assigned: one partition's share, so lookups and probes still trickle.
            return earliest + self.interval * (self.total - 1)
        tick = math.ceil(earliest / self.interval - 1e-9)
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
                    self._bucket.sent(now)
                    return
                self._turn.wait(left)
            if self._closed:
                raise LimiterClosed()


class ImportBudget:
    """Pure: when the next bulk import may be sent (AC: 100 multi-contact imports a minute).

    Imports use the same ownership ticks as requests (see ``LeakyBucket.share``), one tick every
    ``60/per_minute + guard`` seconds: at most one import starts per tick account-wide, however
    partitions move between replicas. A per-replica sliding window would not be safe: a replica
    that just sent a burst alone, followed by new owners with empty windows, overruns AC's minute.
    The 20 ms guard absorbs the delay between a tick and the import reaching AC (at most ~97 a
    minute are started).
    """

    def __init__(self, per_minute: int = 100, guard: float = 0.02) -> None:
        self.interval = 60.0 / per_minute + guard
        self.owned: frozenset[int] | None = None
        self.total = 0
        self.paused_until = float("-inf")
        self._last_tick: int | None = None

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        self.owned = owned if owned is not None and total > 0 else None
        self.total = total

    @property
    def capacity(self) -> int:
        """Imports this replica may start per minute."""
        ratio = 1.0 if self.owned is None else len(self.owned) / self.total
        return int(60.0 / self.interval * ratio)

    def available(self, now: float) -> bool:
        """True while ``now`` is in an owned tick not used yet (and no pause is on)."""
        if now < self.paused_until:
            return False
        tick = math.floor(now / self.interval)
        if self._last_tick is not None and tick <= self._last_tick:
            return False
        return self.owned is None or tick % self.total in self.owned

    def take(self, now: float) -> None:
        self._last_tick = math.floor(now / self.interval)

    def pause(self, until: float) -> None:
        """AC answered "Rate limit exceeded.": no import until ``until``."""
        self.paused_until = max(self.paused_until, until)


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

"""The request budget's thread-safe shell: workers wait here for their slot.

The arithmetic (``LeakyBucket``: slots, shares, pauses, tolerance) is pure and lives in
``service/core/budget.py``; this module only makes threads wait for it. ``RateLimitedTransport``
wraps any httpx transport so that no request, retries and lookups included, can bypass it.

Waiters queue for the next slot; one at a time books it and sleeps until it starts (so a slot
is never lost to a late wake-up). ``urgent`` waiters go ahead of every normal one that has not
booked yet: bulk imports, because AC allows only 100 a minute and an import that waits behind
reads for its request slot holds a worker past the next import tick; ``background`` waiters
(learning contact ids) only get a slot no one else is waiting for. A booked slot is void when
the bucket's epoch changes (a 429's pause, a new share after a rebalance): its holder books
again, so no request leaves in a tick that is no longer ours. Right before the write the
transport asks once more (``leaving``): a thread held up since its slot (the GIL, a busy core)
gives the slot up past the tolerance, or moves the next slots a full interval past its send.
Once the body is written (httpcore's ``trace`` hook) it tells the limiter when (``sent``): a
write held up past the guard moves the next slots too.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from service.core.ac_responses import pause_after
from service.core.budget import LeakyBucket

PRIORITY = "ac_sync_priority"  # request extension: 0 urgent, 1 normal, 2 background
# Request extension: a ``threading.Event``; set once the request's work was revoked. Checked
# after the slot is granted (the wait can be long: a 429's pause), so a request queued before
# its partition moved to another replica never reaches AC after the new owner read it.
CANCEL = "ac_sync_cancel"
_MAX_WAIT = 1.0  # a waiter re-checks at least this often (shares and pauses can change)
# httpcore's trace events ("http11." or "http2." + these) once the request is on the wire.
_WRITTEN = ("send_request_body.complete", "send_request_body.failed")
Trace = Callable[[str, dict[str, Any]], None]
_CALLER_TRACE = "ac_sync_caller_trace"  # request extension: the trace hook the caller set


class RequestCancelled(Exception):
    """The request's work was revoked while it waited for its slot: it was not sent."""


class LimiterClosed(Exception):
    """The limiter was closed (shutdown) while a request waited for a slot."""


class RateLimiter:
    """Thread-safe shell around ``LeakyBucket`` with an injectable clock (wall-clock seconds:
    replicas align their ticks on it)."""

    def __init__(
        self,
        rate: float,
        *,
        guard: float = 0.04,
        tools_every: int = 0,
        clock: Callable[[], float] = time.time,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        self._bucket = LeakyBucket(rate, guard, tools_every=tools_every)
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        self._queue: list[tuple[int, int]] = []  # (priority, arrival): not booked yet
        self._tickets = itertools.count()
        self._booked = False  # a waiter holds the next slot and sleeps until it starts
        self._closed = False
        self._clock = clock
        self._on_wait = on_wait
        self.waiting = 0

    @property
    def rate(self) -> float:
        """This replica's effective request rate (its share of the account budget)."""
        return self._bucket.rate

    @property
    def bucket(self) -> LeakyBucket:
        return self._bucket

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        with self._turn:
            self._bucket.share(owned, total)
            self._turn.notify_all()  # a slot booked under the old share is void

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

    def paused_for(self) -> float:
        with self._lock:
            return max(0.0, self._bucket.paused_until - self._clock())

    def close(self) -> None:
        with self._turn:
            self._closed = True
            self._turn.notify_all()

    def acquire(self, *, urgent: bool = False, priority: int | None = None) -> float:
        """Block until this caller may send one request; return the seconds waited. Waiters go
        by ``priority`` (0 urgent, 1 normal, 2 background), then in arrival order."""
        began = self._clock()
        self.acquire_slot(urgent=urgent, priority=priority)
        return self._clock() - began

    def leaving(self, start: float) -> bool:
        """The request given the slot at ``start`` is about to be written: may it go now
        (``LeakyBucket.leaving``)? False: too late, acquire another slot."""
        with self._turn:
            epoch = self._bucket.epoch
            go = self._bucket.leaving(start, self._clock())
            if self._bucket.epoch != epoch:
                self._turn.notify_all()  # the slots booked are void: their holders book again
            return go

    def sent(self, start: float) -> None:
        """The request given the slot at ``start`` was written (``LeakyBucket.sent``)."""
        with self._turn:
            epoch = self._bucket.epoch
            self._bucket.sent(start, self._clock())
            if self._bucket.epoch != epoch:
                self._turn.notify_all()  # the slots booked are void: their holders book again

    def acquire_slot(self, *, urgent: bool = False, priority: int | None = None) -> float:
        """``acquire``, returning when the slot started (for ``leaving``)."""
        began = self._clock()
        with self._turn:
            rank = priority if priority is not None else (0 if urgent else 1)
            ticket = (rank, next(self._tickets))
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
                    start = self._sleep_until_slot()
                finally:
                    self._booked = False
                    self._turn.notify_all()
            finally:
                if ticket in self._queue:  # closed while queued
                    self._queue.remove(ticket)
                    heapq.heapify(self._queue)
                self.waiting -= 1
        if self._on_wait is not None:
            self._on_wait(self._clock() - began)
        return start

    def _sleep_until_slot(self) -> float:
        """Book the next slot and sleep until it starts (lock held, released while waiting).
        A new epoch (a 429, a new share) voids the slot: book again."""
        while True:
            if self._closed:
                raise LimiterClosed()
            start = self._bucket.reserve(self._clock())
            epoch = self._bucket.epoch
            while not self._closed and self._bucket.epoch == epoch:
                now = self._clock()
                left = start - now
                if left <= 0:
                    if self._bucket.on_time(start, now):
                        return start
                    break  # woken too late: the slot is void, the outer loop books the next
                self._turn.wait(min(left, _MAX_WAIT))


class RateLimitedTransport(httpx.BaseTransport):
    """Every request waits for a slot; a 429 (or a 503 with Retry-After) pauses every other
    request for its (bounded) Retry-After. A request sent with ``extensions={PRIORITY: 0}``
    is served before normal waiters."""

    def __init__(
        self,
        inner: httpx.BaseTransport,
        limiter: RateLimiter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._inner = inner
        self._limiter = limiter
        self._wall = wall

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        priority = int(request.extensions.get(PRIORITY, 1))
        cancel = request.extensions.get(CANCEL)
        while True:
            start = self._limiter.acquire_slot(priority=priority)
            if cancel is not None and cancel.is_set():
                raise RequestCancelled("revoked while waiting for a slot: not sent")
            # The last moment before the write: a thread held up since its slot gives it up
            # (or moves the next slots), rather than leave bunched with them.
            if self._limiter.leaving(start):
                break
        # The caller's own trace hook, if any, still runs; kept aside so that a request sent
        # again (a retry of the same object) is not wrapped twice.
        caller = request.extensions.setdefault(_CALLER_TRACE, request.extensions.get("trace"))
        request.extensions["trace"] = self._on_written(start, caller)
        response = self._inner.handle_request(request)
        pause = pause_after(response.status_code, response.headers.get("Retry-After"), self._wall())
        if pause:
            self._limiter.pause_for(pause)
        return response

    def _on_written(self, start: float, inner: Trace | None) -> Trace:
        """httpcore's trace hook (the ``trace`` request extension): when the request's body
        is written (or its write failed: it may have reached AC), tell the limiter when."""

        def trace(event: str, info: dict[str, Any]) -> None:
            if event.endswith(_WRITTEN):
                self._limiter.sent(start)
            if inner is not None:
                inner(event, info)

        return trace

    def close(self) -> None:
        self._inner.close()

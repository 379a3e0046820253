"""ActiveCampaign on virtual time: the emulator's ``Account`` (one per account, shared by every
replica), reached through each replica's request budget and a network with jitter.

- ``SimLimiter`` is the production ``RateLimiter`` on virtual time: the same ``LeakyBucket``
  arithmetic, urgent requests first, one booked slot at a time, a slot void when the bucket's
  epoch changes (a 429, a new share), a late wake-up within ``tolerance`` keeps its slot.
- ``SimExecutor`` drives the service's real sans-IO calls (``service/core/acapi.py``): each
  request is built by a real ``httpx.Client`` (as ``HttpDriver`` builds it), waits for its slot,
  leaves after a wake-up delay, reaches AC after an upload delay (jitter, bigger for big bodies),
  is answered by ``Account.handle(..., now)`` at that arrival time, and comes back after AC's
  latency; past the request timeout the caller sees a timeout although AC did the work.
- Every arrival is logged with what it carried, for the invariants.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx

from service.core.ac_responses import pause_after
from service.core.acapi import ApiCall, Call, Reply
from service.core.budget import LeakyBucket
from service.devtools.emulator.state import Account
from tests.simulation.world import Actor, World


@dataclass
class Arrival:
    at: float
    replica: str
    method: str
    path: str
    status: int
    contacts: int = 0  # of an import request
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Network:
    """Delays in seconds. ``jitter`` is the spread of the upload delay: with the default guard
    (40 ms at 5/s) the budget's promise holds while wake-up lateness plus jitter stays within
    ``rate * guard / 2`` = 100 ms."""

    wake_late: tuple[float, float] = (0.0, 0.004)
    wake_late_rare: float = 0.02  # an occasional late thread (a GC pause, a busy core)
    wake_late_rare_p: float = 0.02
    upload: float = 0.01
    jitter: float = 0.05
    per_kb: float = 0.0002  # a 250-contact import (~40 KB) takes ~8 ms more to upload
    download: float = 0.01


class SimAccount:
    """The shared account and its arrival log."""

    def __init__(self, world: World, token: str, *, rate: float = 5.0, import_delay: float = 3.0):
        self.world = world
        self.token = token
        self.account = Account({token}, rate_limit=rate, import_delay=import_delay, seed=world.seed)
        self.arrivals: list[Arrival] = []
        self.on_arrival: Callable[[Arrival, dict[str, Any]], None] = lambda arrival, body: None

    def handle(
        self, replica: str, request: httpx.Request
    ) -> tuple[int, dict[str, str], bytes, float]:
        now = self.world.now
        body = request.content
        headers = {k.lower(): v for k, v in request.headers.items()}
        response = self.account.handle(
            request.method, request.url.path, request.url.query.decode(), headers, body, now
        )
        payload: dict[str, Any] = {}
        if body:
            try:
                payload = json.loads(body)
            except ValueError:
                payload = {}
        contacts = len(payload.get("contacts") or []) if "bulk_import" in request.url.path else 0
        arrival = Arrival(
            now,
            replica,
            request.method,
            request.url.path,
            response.status,
            contacts,
            {"query": parse_qs(request.url.query.decode())},
        )
        self.arrivals.append(arrival)
        self.on_arrival(arrival, payload)
        if response.html is not None:
            content, ctype = response.html.encode(), "text/html"
        else:
            content, ctype = json.dumps(response.body).encode(), "application/json"
        headers_out = {"content-type": ctype, **{k.lower(): v for k, v in response.headers.items()}}
        return response.status, headers_out, content, response.delay


@dataclass(order=True)
class _Waiter:
    urgent: int
    seq: int
    go: Callable[[], None] = field(compare=False)


class SimLimiter:
    """The request budget of one replica (the ``requests`` port of the loop)."""

    def __init__(
        self,
        world: World,
        wall: Callable[[], float],
        rate: float,
        guard: float,
        tools_every: int,
        network: Network,
        owner: Actor | None = None,
    ) -> None:
        self.world = world
        self.wall = wall
        self.bucket = LeakyBucket(rate, guard, tools_every=tools_every)
        self.network = network
        self.owner = owner
        self.queue: list[_Waiter] = []
        self.booked = False
        self.closed = False
        self.seq = itertools.count()
        self.waiting = 0

    # ---- the port the loop uses ----------------------------------------------------------

    @property
    def rate(self) -> float:
        return self.bucket.rate

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        self.bucket.share(owned, total)
        self._next()

    def paused_for(self) -> float:
        return max(0.0, self.bucket.paused_until - self.wall())

    def pause_for(self, seconds: float) -> None:
        self.bucket.pause(self.wall() + seconds)

    def close(self) -> None:
        self.closed = True

    def quiesce(self, seconds: float) -> None:  # pragma: no cover - no collector here
        self.pause_for(2 * seconds)

    # ---- waiting for a slot -------------------------------------------------------------

    def acquire(self, priority: int, go: Callable[[], None]) -> None:
        heapq.heappush(self.queue, _Waiter(priority, next(self.seq), go))
        self.waiting += 1
        self._next()

    def _next(self) -> None:
        if self.booked or not self.queue or self.closed:
            return
        waiter = heapq.heappop(self.queue)
        self.booked = True
        self._book(waiter)

    def _book(self, waiter: _Waiter) -> None:
        start = self.bucket.reserve(self.wall())
        epoch = self.bucket.epoch
        if not math.isfinite(start):
            # Nothing owned: wait for a share (``share`` calls ``_next`` again).
            heapq.heappush(self.queue, waiter)
            self.booked = False
            self.world.after(0.5, self._next, self.owner)
            return
        late = self.world.uniform(*self.network.wake_late)
        if self.world.chance(self.network.wake_late_rare_p):
            late += self.world.uniform(0.0, self.network.wake_late_rare)
        delay = start - self.wall() + late

        def wake() -> None:
            if self.closed:
                self.booked = False
                return
            if self.bucket.epoch != epoch or not self.bucket.on_time(start, self.wall()):
                self._book(waiter)  # void: book the next slot
                return
            self.booked = False
            self.waiting -= 1
            waiter.go()
            self._next()

        self.world.after(delay, wake, self.owner)


class SimHandle:
    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._result


class SimExecutor:
    """Runs the loop's AC calls on virtual time (the ``executor`` port)."""

    def __init__(
        self,
        world: World,
        account: SimAccount,
        limiter: SimLimiter,
        replica: str,
        timeout: float,
        network: Network,
        owner: Actor | None = None,
    ) -> None:
        self.world = world
        self.account = account
        self.limiter = limiter
        self.replica = replica
        self.timeout = timeout
        self.network = network
        self.owner = owner
        self.http = httpx.Client(base_url="http://ac.test/api/3/")
        self.requests = 0

    def submit(self, call: Call[Any], cancel: threading.Event) -> SimHandle:
        handle = SimHandle()
        self.world.after(0.0, lambda: self._step(call, None, cancel, handle), self.owner)
        return handle

    def shutdown(self) -> None:
        return None

    def _step(
        self, call: Call[Any], reply: Reply | None, cancel: threading.Event, handle: SimHandle
    ) -> None:
        while True:
            try:
                request = next(call) if reply is None else call.send(reply)
            except StopIteration as done:
                handle._result, handle._done = done.value, True
                return
            except Exception as exc:  # a bug in a call: the loop retries its changes
                handle._error, handle._done = exc, True
                return
            if not cancel.is_set():
                break
            reply = Reply(failure="cancelled")
        self.limiter.acquire(request.priority, lambda: self._send(call, request, cancel, handle))

    def _send(
        self, call: Call[Any], api: ApiCall, cancel: threading.Event, handle: SimHandle
    ) -> None:
        if cancel.is_set():  # revoked while it waited for its slot: not sent (as HttpDriver)
            self._step(call, Reply(failure="cancelled"), cancel, handle)
            return
        self.requests += 1
        request = self.http.build_request(
            api.method,
            api.path,
            params=list(api.params) or None,
            json=api.body,
            headers={"Api-Token": self.account.token, "Accept": "application/json"},
        )
        sent = self.world.now
        net = self.network
        upload = (
            net.upload
            + self.world.uniform(0.0, net.jitter)
            + len(request.content) / 1024 * net.per_kb
        )

        def arrive() -> None:
            status, headers, content, delay = self.account.handle(self.replica, request)
            answered = self.world.now + delay + net.download
            if answered - sent > self.timeout:
                self.world.at(
                    sent + self.timeout,
                    lambda: self._step(call, Reply(failure="timeout"), cancel, handle),
                    self.owner,
                )
                return
            reply = Reply(
                status, headers.get("content-type", ""), content, headers.get("retry-after")
            )

            def back() -> None:
                pause = pause_after(status, reply.retry_after, self.limiter.wall())
                if pause:
                    self.limiter.pause_for(pause)
                self._step(call, reply, cancel, handle)

            self.world.at(answered, back, self.owner)

        # The request reaches AC whether or not its sender still lives.
        self.world.after(upload, arrive)

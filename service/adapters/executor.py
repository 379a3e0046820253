"""The worker pool that runs AC work (sans-IO calls, ``service/core/acapi.py``).

The pipeline hands ``submit`` a ``Call`` and a cancel flag and later looks at the handle
(``done()``, ``result()``). ``ThreadedExecutor`` runs each call on a thread of a pool, sending
its requests through the ``HttpDriver`` (httpx, behind the rate limiter). The simulation has an
executor of its own that runs the same calls on virtual time, with completions in an order the
seed decides (``tests/simulation/``).

A call whose cancel flag is set gets ``TransientApiError("cancelled")`` at its next request
instead of sending it (its partition was revoked: no stale write may land after the new
owner's), and so does a request still waiting for its rate-limit slot when the flag is set
(``send`` gets the flag; simulation seed 10075: a write queued through a 429 pause reached AC
after the new owner had read the contact); the request already on the wire finishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from service.core.acapi import ApiCall, Call, Reply

T = TypeVar("T")


class Handle(Protocol[T]):  # type: ignore[misc]
    def done(self) -> bool: ...

    def result(self, timeout: float | None = None) -> T: ...


class Executor(Protocol):
    def submit(self, call: Call[Any], cancel: threading.Event) -> Handle[Any]: ...

    def shutdown(self) -> None: ...


Send = Callable[[ApiCall, threading.Event], Reply]


def drive(call: Call[T], send: Send, cancel: threading.Event) -> T:
    """Run ``call`` to its end, sending each request with ``send`` (blocking)."""
    try:
        request = next(call)
        while True:
            reply = Reply(failure="cancelled") if cancel.is_set() else send(request, cancel)
            request = call.send(reply)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


class ThreadedExecutor:
    def __init__(self, workers: int, send: Send) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ac")
        self._send = send

    def submit(self, call: Call[Any], cancel: threading.Event) -> Future[Any]:
        return self._pool.submit(drive, call, self._send, cancel)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

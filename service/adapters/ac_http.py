"""Sends AC calls over HTTP: the I/O half of ``service/core/acapi.py``.

``HttpDriver.send`` turns one ``ApiCall`` into one httpx request on the shared client (whose
transport carries the rate limiter, so nothing bypasses the budget), adds the token header
(read fresh for every request: a rotated Secret needs no restart), counts it in the metrics
and returns the ``Reply``. Transport failures become ``Reply(failure=...)``; nothing raised
here ever carries the token, and URLs with emails in their query never reach a log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import httpx

from service.adapters.ratelimit import CANCEL, PRIORITY, LimiterClosed, RequestCancelled
from service.core.acapi import ApiCall, Call, Reply, run_sync
from service.metrics import Metrics

T = TypeVar("T")


class HttpDriver:
    def __init__(
        self,
        http: httpx.Client,
        token: Callable[[], str],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._token = token
        self._metrics = metrics
        self._clock = clock

    def send(self, call: ApiCall, cancel: threading.Event | None = None) -> Reply:
        """``cancel``: set when the call's work was revoked; a request still waiting for its
        slot then is not sent (``Reply(failure="cancelled")``)."""
        started = self._clock()
        extensions: dict[str, object] = {PRIORITY: call.priority}
        if cancel is not None:
            extensions[CANCEL] = cancel
        try:
            request = self._http.build_request(
                call.method,
                call.path,
                params=list(call.params) or None,
                json=call.body,
                headers={"Api-Token": self._token(), "Accept": "application/json"},
                extensions=extensions,
            )
            response = self._http.send(request)
        except httpx.TimeoutException:
            self._count(call, "timeout", started)
            return Reply(failure="timeout")
        except LimiterClosed:
            return Reply(failure="closed")
        except RequestCancelled:
            return Reply(failure="cancelled")
        except httpx.TransportError as exc:
            self._count(call, "conn_error", started)
            return Reply(failure=f"connection error: {type(exc).__name__}")
        self._count(call, str(response.status_code), started)
        if response.status_code == 429 or (
            response.status_code == 400 and b"Rate limit exceeded" in response.content[:200]
        ):
            self._metrics.ac_rate_limited.inc()
        return Reply(
            response.status_code,
            response.headers.get("Content-Type", ""),
            response.content,
            response.headers.get("Retry-After"),
        )

    def _count(self, call: ApiCall, code: str, started: float) -> None:
        self._metrics.ac_requests.labels(call.endpoint, call.method, code).inc()
        self._metrics.ac_request_duration.labels(call.endpoint).observe(
            max(0.0, self._clock() - started)
        )


class AcTool:
    """AC for the operator's commands (``check``, ``reconcile``): a client of its own that
    sends only in the ticks the request budget keeps for tools (``AC_TOOLS_TICK_EVERY``), so
    it shares the account's 5/s with a running service instead of adding to it.
    ``exclusive=True`` (the service is stopped) uses every tick."""

    def __init__(
        self,
        base_url: str,
        token: Callable[[], str],
        *,
        rate: float,
        guard: float,
        tools_every: int,
        timeout: float,
        metrics: Metrics | None = None,
        exclusive: bool = False,
    ) -> None:
        from prometheus_client import CollectorRegistry

        from service.adapters.ratelimit import RateLimitedTransport, RateLimiter
        from service.core.budget import TOOLS

        self.limiter = RateLimiter(rate, guard=guard, tools_every=tools_every)
        if tools_every and not exclusive:
            self.limiter.share(frozenset({TOOLS}), 1)
        self.http = httpx.Client(
            base_url=base_url + "/",
            transport=RateLimitedTransport(httpx.HTTPTransport(retries=0), self.limiter),
            timeout=httpx.Timeout(timeout),
            follow_redirects=False,
        )
        self.driver = HttpDriver(self.http, token, metrics or Metrics(CollectorRegistry()))

    def call(self, work: Call[T]) -> T:
        return run_sync(work, self.driver.send)

    def close(self) -> None:
        self.limiter.close()
        self.http.close()

"""A scheduled garbage collection holds every thread (the GIL). Requests must not leave during
it late, bunched with the slots after it. Real limiter, real threads, a request allowed just
before the stop; the stop is a C call that holds the GIL for ~0.3 s (a collection of a live set
that size would need gigabytes here), and the collector's own order is checked separately."""

import gc
import threading
import time

import pytest

from service.adapters.ratelimit import LimiterClosed, RateLimiter
from service.app.runtime import CollectionSchedule, Collector

RATE = 5.0
QUIESCE = 0.1
PRE_SEND = 0.05  # slot to wire; longer than the main thread takes to start the stop


def pre_send_work(seconds: float) -> None:
    """Python work between the slot and the wire (httpx builds and writes the request)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def seconds_per_item() -> float:
    began = time.perf_counter()
    sum(range(2_000_000))
    return (time.perf_counter() - began) / 2_000_000


def stop_the_world(items: int) -> float:
    """Hold the GIL (one C call: no bytecode runs, so no thread switches). Returns how long."""
    began = time.perf_counter()
    sum(range(items))
    return time.perf_counter() - began


def run(quiesce: bool) -> tuple[float, list[float]]:
    """Four workers send for ~3 s; the stop starts right after the third request was
    allowed. Returns the longest slot-to-wire delay and the send times."""
    items = int(0.4 / seconds_per_item())
    limiter = RateLimiter(RATE)
    sent: list[float] = []
    delays: list[float] = []
    allowed = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            try:
                limiter.acquire()
            except LimiterClosed:
                return
            at = time.monotonic()
            with lock:
                if len(sent) == 2:
                    allowed.set()
            pre_send_work(PRE_SEND)
            now = time.monotonic()
            with lock:
                sent.append(now)
                delays.append(now - at)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert allowed.wait(10)
    if quiesce:
        limiter.quiesce(QUIESCE)
    assert stop_the_world(items) > 0.15  # the stop this test is about
    time.sleep(2.5)
    stop.set()
    limiter.close()
    for thread in threads:
        thread.join(5)
    return max(delays), sent


def most_in_any_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times))


def test_no_request_leaves_late_across_a_stop() -> None:
    longest, sent = run(quiesce=True)
    assert longest < PRE_SEND + 0.05  # every request left within 50 ms of its work
    assert most_in_any_second(sent) <= RATE


def test_without_quiescing_the_request_allowed_before_leaves_late() -> None:
    """The control: the same run without ``quiesce`` shows the delay the guard exists for."""
    longest, _ = run(quiesce=False)
    assert longest > PRE_SEND + 0.1


@pytest.mark.usefixtures("collector_off")
def test_the_collector_quiesces_before_it_collects() -> None:
    order: list[str] = []

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            order.append("collect")

    gc.callbacks.append(on_gc)
    try:
        collector = Collector(CollectionSchedule(interval=60.0, objects=10**9))
        assert collector.maybe_collect(0.0, lambda: order.append("quiesce")) is None
        assert order == []  # not due: nothing held, nothing collected
        assert collector.maybe_collect(60.0, lambda: order.append("quiesce")) is not None
    finally:
        gc.callbacks.remove(on_gc)
    assert order == ["quiesce", "collect"]

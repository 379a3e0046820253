import math
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.ratelimit import (
    LeakyBucket,
    LimiterClosed,
    RateLimitedTransport,
    RateLimiter,
    parse_retry_after,
)


def test_no_burst_one_slot_per_interval() -> None:
    b = LeakyBucket(5, guard=0)
    starts = [b.reserve(0.0) for _ in range(6)]
    assert starts == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])


def test_idle_bucket_does_not_bank_slots() -> None:
    b = LeakyBucket(5, guard=0)
    b.reserve(0.0)
    assert b.reserve(100.0) == 100.0
    assert b.reserve(100.0) == pytest.approx(100.2)


def test_pause_voids_slots_and_blocks_until_retry_after() -> None:
    b = LeakyBucket(5, guard=0)
    b.reserve(0.0)
    epoch = b.pause_epoch
    b.pause(30.0)
    assert b.pause_epoch == epoch + 1
    assert b.paused(10.0)
    assert b.reserve(1.0) == 30.0
    assert b.reserve(1.0) == pytest.approx(30.2)
    b.pause(5.0)  # an earlier deadline never shortens a pause
    assert b.paused_until == 30.0


def test_guard_spaces_slots() -> None:
    b = LeakyBucket(5, guard=0.01)
    assert b.reserve(0) == 0
    assert b.reserve(0) == pytest.approx(0.21)


@given(st.lists(st.floats(0, 10), min_size=2, max_size=50), st.floats(0.5, 50))
def test_any_one_second_window_holds_at_most_rate_requests(arrivals, rate) -> None:  # type: ignore[no-untyped-def]
    b = LeakyBucket(rate, guard=0)
    starts = sorted(b.reserve(t) for t in sorted(arrivals))
    for i, s in enumerate(starts):
        inside = [x for x in starts[i:] if x < s + 1.0 - 1e-9]
        # n requests need (n-1) intervals of 1/rate: n <= ceil(rate) fit in a half-open second.
        assert len(inside) <= math.ceil(rate - 1e-9)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_limiter_acquire_uses_injected_clock() -> None:
    clock = FakeClock()
    waits: list[float] = []
    limiter = RateLimiter(1000, guard=0, clock=clock, on_wait=waits.append)
    limiter.acquire()
    assert waits == [0.0]


def test_transport_pauses_everyone_on_429() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, headers={"Retry-After": "7"})

    limiter = RateLimiter(1000)
    transport = RateLimitedTransport(httpx.MockTransport(answer), limiter)
    with httpx.Client(transport=transport, base_url="http://ac") as client:
        assert client.get("/x").status_code == 429
    assert 6.0 < limiter.paused_for() <= 7.0


def test_parse_retry_after() -> None:
    assert parse_retry_after("30", 5) == 30
    assert parse_retry_after(None, 5) == 5
    assert parse_retry_after("soon", 5) == 5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", 5) == 0


def test_shared_ticks_belong_to_owned_partitions() -> None:
    b = LeakyBucket(5, guard=0)
    b.share(frozenset({1}), total=3)
    starts = [b.reserve(0.0) for _ in range(3)]
    # ticks of 0.2 s; tick k belongs to partition k % 3: ours are 1, 4, 7
    assert starts == pytest.approx([0.2, 0.8, 1.4])
    assert b.share_ratio == pytest.approx(1 / 3)


@given(
    st.lists(st.integers(0, 11), min_size=12, max_size=12),
    st.lists(st.floats(0, 5), min_size=1, max_size=40),
)
def test_replicas_sharing_ticks_never_exceed_the_account_rate(owners, arrivals) -> None:  # type: ignore[no-untyped-def]
    """Partitions split among up to 3 replicas: every tick has at most one sender, so all the
    replicas together stay within 5 in any one-second window."""
    replicas = {o % 3 for o in owners}
    starts: list[float] = []
    for replica in replicas:
        b = LeakyBucket(5, guard=0.01)
        b.share(frozenset(p for p, o in enumerate(owners) if o % 3 == replica), total=12)
        starts += [b.reserve(t) for t in sorted(arrivals)]
    starts.sort()
    for i, s in enumerate(starts):
        assert len([x for x in starts[i:] if x < s + 1.0 - 1e-9]) <= 5
    assert len(set(round(s, 6) for s in starts)) == len(starts)


def test_import_budget_ticks_share_and_pause() -> None:
    from service.ratelimit import ImportBudget

    budget = ImportBudget(per_minute=100, guard=0.02)  # ticks of 0.62 s
    budget.share(frozenset({0, 1, 2, 3}), total=12)
    assert budget.capacity == 32  # a third of ~96.8 a minute
    started = []
    t = 1000.0
    while t < 1060.0:
        if budget.available(t):
            budget.take(t)
            started.append(t)
        t += 0.01
    assert 31 <= len(started) <= 33
    assert all((round(s / 0.62) % 12) in {0, 1, 2, 3} for s in started)
    budget.pause(2000.0)
    assert not any(budget.available(1990.0 + i * 0.01) for i in range(1000))
    assert any(budget.available(2000.0 + i * 0.01) for i in range(800))


@given(st.lists(st.integers(0, 11), min_size=12, max_size=12), st.floats(0, 600))
def test_replicas_never_start_more_than_100_imports_a_minute(owners, offset) -> None:  # type: ignore[no-untyped-def]
    """Three replicas, any split of 12 partitions, each starting imports whenever allowed."""
    from service.ratelimit import ImportBudget

    starts: list[float] = []
    for replica in range(3):
        budget = ImportBudget()
        budget.share(frozenset(p for p, o in enumerate(owners) if o % 3 == replica), total=12)
        t = 5000.0 + offset
        while t < 5000.0 + offset + 150:
            if budget.available(t):
                budget.take(t)
                starts.append(t)
            t += 0.05
    starts.sort()
    for i, s in enumerate(starts):
        assert len([x for x in starts[i:] if x < s + 60.0]) <= 100


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_urgent_waiters_go_ahead_of_normal_ones() -> None:
    limiter = RateLimiter(10, guard=0)  # a slot every 0.1 s
    granted: list[str] = []

    def take(name: str, urgent: bool) -> None:
        limiter.acquire(urgent=urgent)
        granted.append(name)

    limiter.acquire()  # the next slot is 0.1 s away from here on
    threads = [threading.Thread(target=take, args=(f"n{i}", False)) for i in range(4)]
    for n, thread in enumerate(threads, 1):
        thread.start()
        wait_for(lambda n=n: limiter.waiting == n)  # type: ignore[misc]
    urgent = threading.Thread(target=take, args=("urgent", True))
    urgent.start()
    for thread in [*threads, urgent]:
        thread.join(5)
    # One normal waiter may already hold the next slot; the urgent one takes the slot after it.
    assert granted.index("urgent") <= 1
    assert sorted(granted) == ["n0", "n1", "n2", "n3", "urgent"]


def test_close_releases_every_waiter() -> None:
    limiter = RateLimiter(0.5, guard=0)  # a slot every 2 s
    limiter.acquire()
    errors: list[BaseException] = []

    def take() -> None:
        try:
            limiter.acquire()
        except LimiterClosed as exc:
            errors.append(exc)

    threads = [threading.Thread(target=take) for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_for(lambda: limiter.waiting == 3)
    limiter.close()
    for thread in threads:
        thread.join(5)
    assert len(errors) == 3 and limiter.waiting == 0


def test_a_late_send_pushes_the_next_slot_a_full_interval_after_it() -> None:
    b = LeakyBucket(5, guard=0)
    assert b.reserve(0.0) == 0.0
    b.sent(0.15)  # the thread holding the slot woke 150 ms late
    assert b.reserve(0.2) == pytest.approx(0.35)
    b.sent(0.35)  # on time: nothing changes
    assert b.reserve(0.36) == pytest.approx(0.55)


def test_a_send_late_within_the_guard_keeps_the_next_tick() -> None:
    b = LeakyBucket(5, guard=0.01)  # ticks every 0.21 s
    b.share(frozenset(range(4)), 4)  # every tick is ours
    assert b.reserve(0.0) == 0.0
    b.sent(0.004)  # a usual wake-up, a few milliseconds late
    assert b.reserve(0.01) == pytest.approx(0.21)  # the next tick, not the one after
    b.sent(0.21 + 0.05)  # 50 ms late: the next request waits 1/rate after it
    assert b.reserve(0.3) >= 0.26 + 0.2 - 1e-9

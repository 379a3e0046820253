"""When to commit (``CommitSchedule``, pure) and what a commit sends (``Committer``, with a fake
consumer): the first not-done offset of owned partitions, only when it moves forward."""

from __future__ import annotations

import itertools
import logging

import pytest
from confluent_kafka import KafkaException
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline.commit import CommitSchedule, Committer


def test_the_first_commit_is_due_a_full_interval_after_the_first_look() -> None:
    schedule = CommitSchedule(every=5.0)
    assert not schedule.due(100.0, idle=False)
    assert not schedule.due(104.9, idle=False)
    assert schedule.due(105.0, idle=False)


def test_idle_commits_come_at_most_every_idle_interval() -> None:
    schedule = CommitSchedule(every=5.0, idle_every=0.5)
    assert schedule.due(0.0, idle=True)  # idle from the start: commit what is there
    schedule.done(0.0)
    assert not schedule.due(0.49, idle=True)
    assert schedule.due(0.5, idle=True)
    assert not schedule.due(0.5, idle=False)  # busy: the timer, not the idle interval
    schedule.done(0.5)
    assert not schedule.due(5.49, idle=False)
    assert schedule.due(5.5, idle=False)


@given(st.lists(st.tuples(st.floats(0, 3), st.booleans(), st.booleans()), max_size=40))
def test_due_at_most_every_idle_interval_and_at_least_every_interval(
    steps: list[tuple[float, bool, bool]],
) -> None:
    every, idle_every = 2.0, 0.5
    schedule = CommitSchedule(every=every, idle_every=idle_every)
    now, last = 0.0, None
    first = 0.0
    schedule.due(now, idle=False)
    for gap, idle, commit in steps:
        now += gap
        due = schedule.due(now, idle)
        # Deadlines as the schedule states them (``then + every``): ``now - then`` rounds
        # differently (4.0894... - 2.0894... = 1.9999999999999996 where 2.0894... + 2.0 is
        # 4.0894... exactly), and a Hypothesis draw found that difference.
        then = first if last is None else last
        if now >= then + every:
            assert due
        if due and last is not None:
            assert now >= last + idle_every
        if not idle and due:
            assert now >= then + every
        if due and commit:
            schedule.done(now)
            last = now


class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[list[tuple[str, int, int]]] = []
        self.fail = False

    def commit(self, *, offsets: list[object], asynchronous: bool) -> None:
        assert asynchronous is False
        if self.fail:
            raise KafkaException("broker away")
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])  # type: ignore[attr-defined]


def committer() -> tuple[Committer, FakeConsumer, Metrics]:
    """Each call of the clock is 0.25 s after the previous one: a commit takes 0.25 s."""
    consumer = FakeConsumer()
    metrics = Metrics(CollectorRegistry())
    clock = itertools.count(10.0, 0.25)
    c = Committer(
        "t",
        consumer,  # type: ignore[arg-type]
        OffsetTracker(),
        metrics,
        clock=lambda: next(clock),
        wall=lambda: 1700.0,
    )
    return c, consumer, metrics


def sample(metrics: Metrics, name: str, partition: int | None = None) -> float | None:
    labels = None if partition is None else {"topic": "t", "partition": str(partition)}
    return metrics.registry.get_sample_value(name, labels)


def test_commits_the_first_not_done_offset_of_owned_partitions_only() -> None:
    c, consumer, metrics = committer()
    for p in (0, 1, 2):
        for o in (10, 11):
            c.tracker.track(p, o)
    c.tracker.complete(0, 10)
    c.tracker.complete(2, 10)
    c.tracker.complete(2, 11)
    assert c.commit({0, 1, 2}, only={0, 2}) == [(0, 11), (2, 12)]
    assert consumer.commits == [[("t", 0, 11), ("t", 2, 12)]]
    assert c.last == {0: 11, 2: 12}
    assert sample(metrics, "ac_sync_committed_offset", 0) == 11
    assert sample(metrics, "ac_sync_committed_offset", 2) == 12
    assert sample(metrics, "ac_sync_committed_offset", 1) is None
    assert sample(metrics, "ac_sync_last_commit_timestamp_seconds", 0) == 1700.0
    assert sample(metrics, "ac_sync_last_commit_timestamp_seconds", 2) == 1700.0
    assert sample(metrics, "ac_sync_commit_duration_seconds_sum") == pytest.approx(0.25)
    assert sample(metrics, "ac_sync_commit_duration_seconds_count") == 1
    # Nothing moved: nothing is sent. Partition 1 is committed once asked for.
    assert c.commit({0, 2}) == []
    assert c.commit({0, 1, 2}) == [(1, 10)]
    assert consumer.commits[-1] == [("t", 1, 10)]


def test_a_partition_not_owned_is_never_committed() -> None:
    c, consumer, _ = committer()
    c.tracker.track(4, 0)
    c.tracker.complete(4, 0)
    assert c.commit({1}) == [] and consumer.commits == []
    assert c.commit({4}, only={1}) == []
    assert c.commit({4}, only=None) == [(4, 1)]


def test_a_commit_at_offset_zero_is_sent() -> None:
    c, consumer, _ = committer()
    c.tracker.track(0, 0)
    assert c.commit({0}) == [(0, 0)]
    assert consumer.commits == [[("t", 0, 0)]]


def test_a_failed_commit_is_counted_logged_and_retried_next_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    c, consumer, metrics = committer()
    c.tracker.track(0, 5)
    c.tracker.complete(0, 5)
    consumer.fail = True
    with caplog.at_level(logging.WARNING, logger="service.pipeline.commit"):
        assert c.commit({0}) == []
    assert sample(metrics, "ac_sync_commit_failures_total") == 1
    assert sample(metrics, "ac_sync_commit_duration_seconds_count") == 0
    [record] = caplog.records
    assert record.getMessage() == "commit failed; will retry"
    assert "broker away" in record.error  # type: ignore[attr-defined]
    assert c.last == {}
    consumer.fail = False
    assert c.commit({0}) == [(0, 6)]


def test_forget_lets_a_reassigned_partition_commit_again() -> None:
    c, _, _ = committer()
    c.tracker.track(3, 7)
    c.tracker.complete(3, 7)
    assert c.commit({3}) == [(3, 8)]
    c.forget({3, 9})
    assert c.last == {}
    assert c.commit({3}) == [(3, 8)]

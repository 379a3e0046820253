"""When to commit, and committing. ``CommitSchedule`` is pure; ``Committer`` calls the consumer.

Commit the first not-done offset of each owned partition (``OffsetTracker.committable``):
periodically, as soon as the work runs out (a drained backlog is committed at once, so a
restart repeats nothing), and on revoke and shutdown for the partitions concerned. A commit
that would not move a partition forward is not sent; a failed commit is retried at the next
turn (offsets never go backwards by our hand).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaException, TopicPartition

from service.adapters.kafka import Consumer
from service.core.offsets import OffsetTracker
from service.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class CommitSchedule:
    """Invariant: ``due`` at most every ``idle_every`` seconds while idle, and at least every
    ``every`` seconds while busy."""

    every: float
    idle_every: float = 0.5
    _next: float | None = None
    _next_idle: float = float("-inf")

    def due(self, now: float, idle: bool) -> bool:
        if self._next is None:
            self._next = now + self.every
        return now >= self._next or (idle and now >= self._next_idle)

    def done(self, now: float) -> None:
        self._next = now + self.every
        self._next_idle = now + self.idle_every


@dataclass
class Committer:
    topic: str
    consumer: Consumer
    tracker: OffsetTracker
    metrics: Metrics
    clock: Callable[[], float]
    wall: Callable[[], float]
    last: dict[int, int] = field(default_factory=dict)  # partition -> last committed offset

    def commit(self, owned: set[int], only: set[int] | None = None) -> list[tuple[int, int]]:
        """Commit what may be committed; return the (partition, offset) pairs committed."""
        offsets = [
            TopicPartition(self.topic, p, o)
            for p, o in sorted(self.tracker.committable().items())
            if p in owned and (only is None or p in only) and o > self.last.get(p, -1)
        ]
        if not offsets:
            return []
        started = self.clock()
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            logger.warning("commit failed; will retry", extra={"error": str(exc)})
            return []
        self.metrics.commit_duration.observe(max(0.0, self.clock() - started))
        wall = self.wall()
        for tp in offsets:
            self.last[tp.partition] = tp.offset
            labels = (self.topic, str(tp.partition))
            self.metrics.committed_offset.labels(*labels).set(tp.offset)
            self.metrics.last_commit_timestamp.labels(*labels).set(wall)
        return [(tp.partition, tp.offset) for tp in offsets]

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.last.pop(partition, None)

"""Back-pressure: which partitions to pause, which to resume (``decide`` is pure; ``Pauses``
keeps the reasons and tells the consumer).

What is held in memory for a partition: its pending changes (in the coalescer and in flight),
its tracked offsets (every consumed offset stays tracked until the commit point passes it, so a
stuck head makes this grow even when changes are few), the contacts of its outstanding imports,
and the bytes of its pending records. A partition is paused when the whole replica is over its
bound (every partition: new work cannot be taken) or when that partition alone holds more than
its fair part of the tracked offsets (a stuck head: only that partition). It resumes when the
load is back under half the bound (hysteresis: no flapping). A paused partition keeps being
polled, so the group session stays alive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition


@dataclass(frozen=True)
class Load:
    changes: int  # pending + in flight
    tracked: Mapping[int, int]  # tracked offsets per partition
    held_bytes: int  # bytes of pending records (values kept for the DLQ)


@dataclass(frozen=True)
class Bounds:
    max_changes: int
    max_tracked: int
    max_bytes: int


@dataclass(frozen=True)
class Decision:
    pause: frozenset[int]
    resume: frozenset[int]


def decide(load: Load, bounds: Bounds, paused: frozenset[int], owned: frozenset[int]) -> Decision:
    """Which of ``owned`` to pause and resume, given what is paused now."""
    total_tracked = sum(load.tracked.values())
    over = (
        load.changes >= bounds.max_changes
        or total_tracked >= bounds.max_tracked
        or load.held_bytes >= bounds.max_bytes
    )
    under = (
        load.changes <= bounds.max_changes // 2
        and total_tracked <= bounds.max_tracked // 2
        and load.held_bytes <= bounds.max_bytes // 2
    )
    share = max(1, bounds.max_tracked // max(1, len(owned)))
    want: set[int] = set()
    for partition in owned:
        tracked = load.tracked.get(partition, 0)
        if over or tracked >= share:
            want.add(partition)
        elif partition in paused and not (under and tracked <= share // 2):
            want.add(partition)  # hysteresis: stay paused until well under
    return Decision(frozenset(want - paused), frozenset((paused & owned) - want))


class Pauses:
    """Why each partition is paused (back-pressure, a ledger restore, a schema outage); the
    consumer pauses a partition while any reason holds and resumes it when none is left."""

    def __init__(self, topic: str, consumer: Any) -> None:
        self.topic = topic
        self.consumer = consumer
        self.reasons: dict[int, set[str]] = {}

    def hold(self, partition: int, reason: str) -> None:
        reasons = self.reasons.setdefault(partition, set())
        if not reasons:
            self.consumer.pause([TopicPartition(self.topic, partition)])
        reasons.add(reason)

    def release(self, partition: int, reason: str) -> None:
        reasons = self.reasons.get(partition)
        if not reasons or reason not in reasons:
            return
        reasons.discard(reason)
        if not reasons:
            del self.reasons[partition]
            self.consumer.resume([TopicPartition(self.topic, partition)])

    def held(self, reason: str) -> frozenset[int]:
        return frozenset(p for p, r in self.reasons.items() if reason in r)

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.reasons.pop(partition, None)

    def paused(self) -> int:
        return len(self.reasons)

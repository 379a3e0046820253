"""Consumed records in, pending changes out: track, decode, name the list, coalesce.

- Every record of an owned partition is tracked (its offset completes when its change is
  recorded or parked); a record that can never be applied goes to the dead-letter topic with
  its reason (``PoisonMessage``).
- A record whose writer schema cannot be fetched right now (the registry is down:
  ``SchemaUnavailable``) is not poison: it and every later record of its partition are *held*
  (kept in order, the partition paused) and decoded again after a back-off; nothing is lost and
  nothing is parked. The same holding keeps the records of a partition whose ledger is still
  being restored (records returned by the ``consume`` that assigned it).
- A record that a later record of the same key supersedes, as the partition's backlog was read
  ahead on assignment (``pipeline/ahead.py``), completes at once: nothing is sent for it. A
  record whose email has a later record in that backlog is held in the coalescer until that
  record is added (``Coalescer.add(hold=True)``): the email's lists leave together.
- Once a partition's end is reached, changes of records published more than a window ago are
  due at once (``Coalescer.expedite``): a backlog then leaves when a consumer that had kept up
  would have sent it.
- The dead-letter breaker (``service/core/breaker.py``): once too many of a partition's recent
  records were poison, the partition is paused (``POISON``) and the records consumed after the
  one that tripped it are held, untracked, until the process restarts (or the partition moves
  to another owner, who starts with an empty window).
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError

from service.core.breaker import PoisonBreaker
from service.core.coalesce import Coalescer, ListRef
from service.core.codec import EventDecoder
from service.core.errors import PoisonMessage, SchemaUnavailable
from service.core.lists import ListNamer
from service.core.lookahead import CONTINUES, SUPERSEDED, Backlog
from service.core.model import MembershipEvent
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline.confirm import Confirmer
from service.pipeline.ownership import Ownership

logger = logging.getLogger(__name__)

SCHEMA = "schema"
RESTORING = "restoring"
POISON = "poison"  # the dead-letter breaker tripped


@dataclass
class Source:
    topic: str
    tracker: OffsetTracker
    coalescer: Coalescer
    decoder: EventDecoder
    namer: ListNamer
    confirm: Confirmer
    ownership: Ownership
    metrics: Metrics
    wall: Callable[[], float]
    hold: Callable[[int, str], None]  # pause a partition for a reason
    unhold: Callable[[int, str], None]
    list_seen: Callable[[ListRef], None]
    expedite: bool = True
    breaker: PoisonBreaker = field(default_factory=PoisonBreaker.off)
    broker_ok: bool = False
    held: dict[int, deque[Any]] = field(default_factory=dict)
    held_until: dict[int, float] = field(default_factory=dict)
    # Per partition, since it was last caught up: (last offset, publication time) per batch.
    published: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    # Partitions whose end was reached while their records were held (the ledger restoring,
    # the registry down): caught up once the held records are processed. librdkafka reports a
    # partition's end once, so forgetting it left a backlog read at assignment waiting a whole
    # window after it was read.
    ended_while_held: set[int] = field(default_factory=set)
    # Per partition, its backlog as read ahead on assignment (``pipeline/ahead.py``); dropped
    # once processing reaches the last record read ahead.
    ahead: dict[int, Backlog] = field(default_factory=dict)
    _counters: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Per-record counters, resolved once (labels() takes a lock and a dict lookup each time).
        self._counters = {
            o: self.metrics.events_consumed.labels(self.topic, o)
            for o in ("valid", "invalid", "duplicate")
        }

    # ---- intake --------------------------------------------------------------------------

    def ingest(self, messages: list[Any], now: float) -> None:
        accepted: list[Any] = []
        caught_up: list[int] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self.broker_ok = True  # a broker's answer too: an empty partition is healthy
                    caught_up.append(message.partition())
                else:
                    logger.warning("consumer error", extra={"error": error.str()})
                    if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
                        self.broker_ok = False
                continue
            self.broker_ok = True
            partition = message.partition()
            if partition not in self.ownership.assigned:
                self._counters["duplicate"].inc()
                continue
            if self.held.get(partition) or partition in self.ownership.restoring:
                self._hold(
                    partition,
                    message,
                    RESTORING if partition in self.ownership.restoring else SCHEMA,
                )
                continue
            accepted.append(message)
        if accepted:
            self._process(accepted, now)
        for partition in caught_up:
            if self.held.get(partition) or partition in self.ownership.restoring:
                self.ended_while_held.add(partition)
            else:
                self._caught_up(partition, now)

    def _hold(self, partition: int, message: Any, reason: str) -> None:
        queue = self.held.setdefault(partition, deque())
        if not queue:
            self.hold(partition, reason)
        queue.append(message)

    def retry_held(self, now: float) -> None:
        """Decode held records again: a partition whose ledger is loaded, or whose registry
        back-off is over."""
        for partition in list(self.held):
            if (
                partition in self.ownership.restoring
                or partition in self.breaker.tripped
                or now < self.held_until.get(partition, 0.0)
            ):
                continue
            queue = self.held.pop(partition)
            self.held_until.pop(partition, None)
            self.unhold(partition, RESTORING)
            self.unhold(partition, SCHEMA)
            if queue:
                self._process(list(queue), now)
        for partition in list(self.ended_while_held):
            if partition not in self.ownership.restoring and not self.held.get(partition):
                self.ended_while_held.discard(partition)
                self._caught_up(partition, now)

    def _process(self, accepted: list[Any], now: float) -> None:
        decoded = self.decoder.decode_batch([m.value() for m in accepted])
        valid = coalesced = 0
        stale_before = self.coalescer.stale_records
        last: dict[int, Any] = {}
        for message, event in zip(accepted, decoded, strict=True):
            partition = message.partition()
            if partition in self.breaker.tripped:
                self._hold(partition, message, POISON)  # read again by the next owner or life
                continue
            if self.held.get(partition):
                self.held[partition].append(message)  # behind a held record: keep the order
                continue
            if isinstance(event, SchemaUnavailable):
                self.held_until[partition] = now + max(0.5, event.retry_after)
                self._hold(partition, message, SCHEMA)
                logger.warning(
                    "writer schema unavailable; partition waits",
                    extra={"partition": partition, "schema_id": event.schema_id},
                )
                continue
            if not self.tracker.track(partition, message.offset()):
                self._counters["duplicate"].inc()
                continue
            last[partition] = message
            if isinstance(event, PoisonMessage):
                self._dead_letter(message, event)
                continue
            assert isinstance(event, MembershipEvent)
            try:
                target = self.namer(event)
            except PoisonMessage as poison:
                self._dead_letter(message, poison)
                continue
            valid += 1
            self.list_seen(target)
            backlog = self.ahead.get(partition)
            mark = 0 if backlog is None else self._ahead_mark(backlog, partition, message)
            if mark == SUPERSEDED:
                coalesced += 1
                continue
            coalesced += self.coalescer.add(
                partition,
                target,
                event,
                message.value(),
                message.offset(),
                now,
                message.headers(),
                hold=mark == CONTINUES,
            )
        self._counters["valid"].inc(valid)
        self.metrics.events_coalesced.inc(coalesced)
        if self.coalescer.stale_records > stale_before:
            stale = self.coalescer.stale_records - stale_before
            self.metrics.changes_skipped.labels("stale").inc(stale)
        # When the batch's records were published, per partition: its last record's timestamp
        # bounds every earlier one's (for ``_caught_up``).
        for partition, message in last.items() if self.expedite else ():
            kind, stamp = message.timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE and stamp > 0:
                self.published.setdefault(partition, []).append((message.offset(), stamp / 1000))

    def _ahead_mark(self, backlog: Backlog, partition: int, message: Any) -> int:
        """What the backlog read ahead says of this record (``Backlog.mark``). Superseded by a
        later record of its key: done now, as if coalesced into it (that record is not
        committed until its own change settles)."""
        offset = message.offset()
        if backlog.passed(offset):
            # Processing reached the end of what was read ahead: a change still held waits
            # for a record that was not added (a later record refused, say): it goes now.
            del self.ahead[partition]
            self.coalescer.release_holds(partition)
        mark = backlog.mark(offset)
        if mark == SUPERSEDED:
            self.tracker.complete(partition, offset)
        return mark

    def _dead_letter(self, message: Any, poison: PoisonMessage) -> None:
        partition, offset = message.partition(), message.offset()
        self._counters["invalid"].inc()
        logger.info(
            "record to dead-letter topic",
            extra={"reason": poison.reason, "partition": partition, "offset": offset},
        )
        self.confirm.park_record(
            message.key(),
            message.value(),
            partition,
            offset,
            poison,
            self.ownership.generation(partition),
            message.headers(),
        )
        if self.breaker.poison(partition, offset):
            self.hold(partition, POISON)
            self.metrics.dlq_breaker_open.set(len(self.breaker.tripped))
            logger.error(
                "dead-letter breaker open: partition paused until a restart",
                extra={
                    "partition": partition,
                    "offset": offset,
                    "poison_share": round(self.breaker.share(partition), 3),
                    "window": self.breaker.window,
                    "max_share": self.breaker.max_share,
                },
            )

    def _caught_up(self, partition: int, now: float) -> None:
        """The partition's end was reached: changes of records published more than a window ago
        are due now (see ``Coalescer.expedite``)."""
        stamps = self.published.pop(partition, [])
        if not stamps or not self.expedite or partition not in self.ownership.assigned:
            return
        offsets = [offset for offset, _ in stamps]

        def published(offset: int) -> float | None:
            at = bisect.bisect_left(offsets, offset)
            return stamps[at][1] if at < len(stamps) else None

        moved = self.coalescer.expedite(partition, now, self.wall(), published)
        if moved:
            logger.debug("caught up", extra={"partition": partition, "sooner": moved})

    def forget(self, partitions: set[int]) -> None:
        self.breaker.forget(partitions)
        self.metrics.dlq_breaker_open.set(len(self.breaker.tripped))
        for partition in partitions:
            self.held.pop(partition, None)
            self.held_until.pop(partition, None)
            self.published.pop(partition, None)
            self.ended_while_held.discard(partition)
            self.ahead.pop(partition, None)

    def held_records(self) -> int:
        return sum(len(q) for q in self.held.values())

"""The loop: poll, decode, coalesce, deliver, commit. The only place with mutable pipeline state.

One thread (the caller of ``run``) owns the consumer, the coalescer and the offset tracker;
confluent-kafka calls the rebalance callbacks from inside ``consume()`` on this same thread.
Deliveries run on a small worker pool; their outcomes come back as futures that this thread
drains, so no pipeline state is ever touched by two threads.

Promises:
- an offset is committed only when its change was applied, superseded by an applied later
  change for the same key, or parked in the DLQ with the broker's ack (``OffsetTracker``);
- one email is never in two requests at once (the ``busy`` set);
- the loop never sleeps for long: back-pressure pauses partitions and keeps polling;
- revoke: drop pending work of the partitions, let their in-flight work finish within
  ``REVOKE_DEADLINE_SECONDS``, commit their watermark, forget them. Lost: drop without commit.
- SIGTERM: stop consuming, flush within ``SHUTDOWN_GRACE_SECONDS``, commit, close, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from service.apply import ChangeOutcome, ContactApplier, OutcomeKind
from service.backoff import backoff_delay
from service.coalesce import Coalescer, PendingChange
from service.codec import EventDecoder
from service.dlq import DeadLetter, DeadLetterQueue
from service.errors import PermanentApiError, PoisonMessage
from service.lists import list_for_event
from service.logs import EmailHasher
from service.metrics import Metrics
from service.offsets import OffsetTracker
from service.ratelimit import RateLimiter
from service.settings import Settings

logger = logging.getLogger(__name__)

CONSUME_BATCH = 500
AUTH_RETRY_SECONDS = 15.0


@dataclass
class _InFlight:
    email: str
    partition: int
    generation: int
    changes: list[PendingChange]
    cancel: threading.Event


class Runner:
    def __init__(
        self,
        settings: Settings,
        consumer: Any,
        producer: Any,
        decoder: EventDecoder,
        applier: ContactApplier,
        limiter: RateLimiter,
        metrics: Metrics,
        hasher: EmailHasher,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.kafka_topic
        self.consumer = consumer
        self.decoder = decoder
        self.applier = applier
        self.limiter = limiter
        self.metrics = metrics
        self.hash = hasher
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.coalescer = Coalescer(settings.coalesce_window_seconds)
        self.tracker = OffsetTracker()
        self.dlq = DeadLetterQueue(producer, settings.kafka_dlq_topic, self._parked)
        self.pool = ThreadPoolExecutor(settings.ac_concurrency, thread_name_prefix="ac")
        self.inflight: dict[Future[list[ChangeOutcome]], _InFlight] = {}
        self.busy: set[str] = set()
        self.assigned: set[int] = set()
        self.generation: dict[int, int] = {}
        self.last_committed: dict[int, int] = {}
        self.paused = False
        self.auth_blocked = False
        self.auth_retry_at = 0.0
        self.broker_ok = False
        self.last_heartbeat = clock()
        self._stop = threading.Event()
        self._next_commit = clock() + settings.commit_interval_seconds
        self._closing = False

    # ---- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def on_kafka_error(self, error: Any) -> None:
        """librdkafka's ``error_cb``: broker reachability feeds readiness."""
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.broker_ok = False
        logger.warning("kafka error", extra={"error": error.str()})

    def run(self) -> int:
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        logger.info("consuming", extra={"topic": self.topic, "group": self.settings.kafka_group_id})
        try:
            while not self._stop.is_set():
                self.step()
            self.shutdown()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
        return 0

    def step(self) -> None:
        """One loop iteration. Never blocks for more than a fraction of a second."""
        busy = bool(self.inflight) or len(self.coalescer) > 0
        messages = self.consumer.consume(CONSUME_BATCH, 0.05 if busy else 0.25)
        now = self.clock()
        for message in messages:
            self._ingest(message, now)
        self._drain(now)
        self._dispatch(now)
        self.dlq.poll()
        self._apply_backpressure()
        if now >= self._next_commit:
            self.commit()
            self._update_lag()
            self._next_commit = now + self.settings.commit_interval_seconds
        self._heartbeat(now)

    def shutdown(self) -> None:
        """Stop consuming, flush within the grace period, commit, close."""
        grace = self.settings.shutdown_grace_seconds
        deadline = self.clock() + grace
        logger.info("shutting down", extra={"grace_seconds": grace, "pending": len(self.coalescer)})
        if self.assigned:
            self.consumer.pause([TopicPartition(self.topic, p) for p in self.assigned])
        while self.clock() < deadline and (len(self.coalescer) or self.inflight):
            self.consumer.consume(CONSUME_BATCH, 0.05)  # keeps the group session alive; paused
            now = self.clock()
            self._drain(now)
            self._dispatch(now, flush_all=True)
            self.dlq.poll()
            self._heartbeat(now)
        self.dlq.flush(max(0.5, deadline - self.clock()))
        self.limiter.close()
        self._drain(self.clock())
        self.commit()
        self._closing = True
        left = len(self.coalescer) + sum(len(f.changes) for f in self.inflight.values())
        self.consumer.close()
        logger.info("stopped", extra={"changes_left_uncommitted": left})

    # ---- ingest --------------------------------------------------------------------------

    def _ingest(self, message: Any, now: float) -> None:
        error = message.error()
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                logger.warning("consumer error", extra={"error": error.str()})
                if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
                    self.broker_ok = False
            return
        self.broker_ok = True
        partition, offset = message.partition(), message.offset()
        if partition not in self.assigned or not self.tracker.track(partition, offset):
            self.metrics.events_consumed.labels(self.topic, "duplicate").inc()
            return
        try:
            event = self.decoder.decode(message.value())
            target = list_for_event(
                event, self.settings.list_name_template, self.settings.list_mapping
            )
        except PoisonMessage as poison:
            self.metrics.events_consumed.labels(self.topic, "invalid").inc()
            logger.info(
                "record to dead-letter topic",
                extra={"reason": poison.reason, "partition": partition, "offset": offset},
            )
            self.dlq.send(
                DeadLetter(
                    message.key(),
                    message.value(),
                    poison.reason,
                    type(poison).__name__,
                    poison.detail,
                    self.topic,
                    partition,
                    offset,
                )
            )
            return
        self.metrics.events_consumed.labels(self.topic, "valid").inc()
        if self.coalescer.add(partition, target, event, message.value(), offset, now):
            self.metrics.events_coalesced.inc()

    def _parked(self, letter: DeadLetter) -> None:
        """Broker acknowledged a dead letter: its offsets are done."""
        if letter.source_partition not in self.assigned:
            return
        self.metrics.dlq_records.labels(letter.reason).inc()
        for offset in letter.covered_offsets or (letter.source_offset,):
            self.tracker.complete(letter.source_partition, offset)

    # ---- delivery ------------------------------------------------------------------------

    def _dispatch(self, now: float, *, flush_all: bool = False) -> None:
        free = self.settings.ac_concurrency - len(self.inflight)
        if free <= 0:
            return
        if self.auth_blocked:
            if now < self.auth_retry_at or self.inflight:
                return
            free = 1  # one probe at a time while the token is refused
            self.auth_retry_at = now + AUTH_RETRY_SECONDS
        groups = self.coalescer.take_due(now, limit=free, busy=self.busy, flush_all=flush_all)
        for group in groups:
            email, partition = group[0].email, group[0].partition
            cancel = threading.Event()
            future = self.pool.submit(self.applier.apply, email, group, cancel)
            self.inflight[future] = _InFlight(
                email, partition, self.generation.get(partition, 0), group, cancel
            )
            self.busy.add(email)
        self._gauges()

    def _drain(self, now: float) -> None:
        done = [f for f in self.inflight if f.done()]
        for future in done:
            item = self.inflight.pop(future)
            self.busy.discard(item.email)
            try:
                outcomes = future.result()
            except Exception:
                logger.exception(
                    "delivery crashed; retrying", extra={"email_hash": self.hash(item.email)}
                )
                outcomes = [ChangeOutcome(c, OutcomeKind.RETRY) for c in item.changes]
            if (
                item.partition not in self.assigned
                or self.generation.get(item.partition) != item.generation
            ):
                continue  # the partition moved on: its offsets were dropped or re-tracked
            for outcome in outcomes:
                self._settle(outcome, now)
        if done:
            self._gauges()

    def _settle(self, outcome: ChangeOutcome, now: float) -> None:
        change = outcome.change
        if outcome.kind is OutcomeKind.APPLIED:
            if self.auth_blocked:
                logger.info("ActiveCampaign accepts the token again")
            self.auth_blocked = False
            self.metrics.auth_rejected.set(0)
            for source in change.offsets:
                self.tracker.complete(source.partition, source.offset)
            self.metrics.changes_applied.labels(change.event.action.value.lower()).inc()
            age = self.wall() - change.event.occurred_at_ms / 1000.0
            self.metrics.event_to_applied.observe(max(0.0, age))
        elif outcome.kind is OutcomeKind.PERMANENT:
            error = outcome.error
            assert isinstance(error, PermanentApiError)
            logger.info(
                "ActiveCampaign refused a change; to dead-letter topic",
                extra={
                    "email_hash": self.hash(change.email),
                    "ac_status": error.status,
                    "ac_code": error.code,
                    "partition": change.partition,
                },
            )
            last = change.offsets[-1]
            reason = "list_missing" if error.code == "list_missing" else "ac_rejected"
            self.dlq.send(
                DeadLetter(
                    change.email.encode(),
                    change.raw,
                    reason,
                    type(error).__name__,
                    error.detail,
                    self.topic,
                    last.partition,
                    last.offset,
                    covered_offsets=tuple(o.offset for o in change.offsets),
                    ac_status=error.status,
                    ac_code=error.code,
                )
            )
        elif outcome.kind is OutcomeKind.AUTH:
            if not self.auth_blocked:
                logger.error(
                    "ActiveCampaign refused the token: all sending stops until it is accepted",
                    extra={"ac_status": outcome.error.status if outcome.error else None},
                )
            self.auth_blocked = True
            self.auth_retry_at = max(self.auth_retry_at, now + AUTH_RETRY_SECONDS)
            self.metrics.auth_rejected.set(1)
            self.coalescer.requeue(change, self.auth_retry_at)
        else:
            change.attempts += 1
            delay = backoff_delay(
                change.attempts - 1, self.rng.random(), cap=self.settings.retry_max_backoff_seconds
            )
            delay = max(delay, outcome.retry_after)
            reason = "rate_limited" if outcome.retry_after else "transient"
            self.metrics.ac_retries.labels(reason).inc()
            change.last_error = str(outcome.error) if outcome.error else "crash"
            self.coalescer.requeue(change, now + delay)

    # ---- back-pressure -------------------------------------------------------------------

    def _apply_backpressure(self) -> None:
        load = len(self.coalescer) + sum(len(f.changes) for f in self.inflight.values())
        limit = self.settings.max_pending_changes
        partitions = [TopicPartition(self.topic, p) for p in self.assigned]
        if not self.paused and load >= limit:
            self.consumer.pause(partitions)
            self.paused = True
            logger.info("pending work at its bound; partitions paused", extra={"pending": load})
        elif self.paused and load <= limit // 2:
            self.consumer.resume(partitions)
            self.paused = False
            logger.info("pending work drained; partitions resumed", extra={"pending": load})
        self.metrics.paused_partitions.set(len(partitions) if self.paused else 0)

    # ---- commits -------------------------------------------------------------------------

    def commit(self, only: set[int] | None = None) -> None:
        committable = self.tracker.committable()
        offsets = [
            TopicPartition(self.topic, p, o)
            for p, o in committable.items()
            if p in self.assigned
            and (only is None or p in only)
            and o > self.last_committed.get(p, -1)
        ]
        if not offsets:
            return
        started = self.clock()
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            logger.warning("commit failed; will retry", extra={"error": str(exc)})
            return
        self.metrics.commit_duration.observe(self.clock() - started)
        wall = self.wall()
        for tp in offsets:
            self.last_committed[tp.partition] = tp.offset
            labels = (self.topic, str(tp.partition))
            self.metrics.committed_offset.labels(*labels).set(tp.offset)
            self.metrics.last_commit_timestamp.labels(*labels).set(wall)

    def _update_lag(self) -> None:
        for partition in self.assigned:
            tp = TopicPartition(self.topic, partition)
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            labels = (self.topic, str(partition))
            committed = self.last_committed.get(partition, -1)
            if high >= 0 and committed >= 0:
                self.metrics.consumer_lag.labels(*labels).set(max(0, high - committed))
            self.metrics.inflight_uncommitted.labels(*labels).set(
                self.tracker.outstanding(partition)
            )

    # ---- rebalance callbacks (run inside consume(), on this thread) ----------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        mine = [tp for tp in partitions if tp.topic == self.topic]
        self.broker_ok = True
        for tp in mine:
            self.assigned.add(tp.partition)
            self.generation[tp.partition] = self.generation.get(tp.partition, 0) + 1
            self.tracker.drop([tp.partition])
        try:
            committed = consumer.committed(mine, timeout=10)
            for tp in committed:
                self.last_committed[tp.partition] = tp.offset if tp.offset >= 0 else -1
        except KafkaException as exc:
            logger.warning("could not read committed offsets", extra={"error": str(exc)})
        if self.paused and mine:
            consumer.pause(mine)
        self.metrics.assigned_partitions.set(len(self.assigned))
        logger.info(
            "partitions assigned", extra={"partitions": sorted(tp.partition for tp in mine)}
        )

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("revoke").inc()
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        if not self._closing:
            self.coalescer.discard(gone)
            for item in self.inflight.values():
                if item.partition in gone:
                    item.cancel.set()  # finish the request on the wire, send no more
            deadline = self.clock() + self.settings.revoke_deadline_seconds
            while self.clock() < deadline and any(
                f.partition in gone for f in self.inflight.values()
            ):
                time.sleep(0.02)  # bounded by the revoke deadline; workers are finishing
                self._drain(self.clock())
            self.coalescer.discard(gone)  # retries requeued while draining
            self.dlq.flush(max(0.1, deadline - self.clock()))
            self.commit(only=gone)
        self._forget(gone)
        logger.info("partitions revoked", extra={"partitions": sorted(gone)})

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("lost").inc()
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        self.coalescer.discard(gone)
        self._forget(gone)
        logger.warning(
            "partitions lost; their work is dropped uncommitted", extra={"partitions": sorted(gone)}
        )

    def _forget(self, gone: set[int]) -> None:
        self.tracker.drop(gone)
        self.assigned -= gone
        for partition in gone:
            self.last_committed.pop(partition, None)
            labels = (self.topic, str(partition))
            for gauge in (self.metrics.consumer_lag, self.metrics.inflight_uncommitted):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self.metrics.assigned_partitions.set(len(self.assigned))

    # ---- observation ---------------------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.changes_pending.set(len(self.coalescer))
        self.metrics.changes_inflight.set(sum(len(f.changes) for f in self.inflight.values()))

    def _heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        self.metrics.heartbeat.set(self.wall())
        self.metrics.ratelimit_queue_depth.set(self.limiter.waiting)
        self.metrics.ratelimit_rate.set(self.limiter.rate)
        self.metrics.ratelimit_paused.set(1 if self.limiter.paused() else 0)
        self._gauges()
        ok, _ = self.readiness()
        self.metrics.ready.set(1 if ok else 0)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = self.clock() - self.last_heartbeat
        return age < 60.0, {"loop_age_seconds": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail = {
            "assigned_partitions": len(self.assigned),
            "broker_connected": self.broker_ok,
            "token_accepted": not self.auth_blocked,
        }
        return bool(self.assigned) and self.broker_ok and not self.auth_blocked, detail

"""The loop: it only sequences the stages. The one thread that owns the consumer and all state.

::

    consume ─► rebalance.settle ─► source (track, decode, coalesce; poison ─► DLQ)
            ─► dispatcher.completed ─► delivery.completed (confirm: ledger ─► offsets on ack)
            ─► delivery.step (take, lists, plan, verify, imports, per contact)
            ─► acked producer (ledger, DLQ acks) ─► flow (pause/resume) ─► commit ─► heartbeat

confluent-kafka calls the rebalance callbacks from inside ``consume()`` on this same thread;
AC work runs on the executor's workers and comes back as handles this thread drains, so no
pipeline state is ever touched by two threads.

Promises (each kept by one stage, checked by the simulation in ``tests/simulation/``):
- an offset is committed only when its change was recorded after AC confirmed it (ledger ack),
  superseded by such a change, or parked in the DLQ with the broker's ack (``confirm``);
- one email is never in two requests at once, and never written while an import that may
  still land is outstanding for it (``deliver``, ``imports``);
- never more than the account's request and import budgets (``core/budget.py``), across
  replicas, rebalances and restarts;
- the loop never sleeps for long: back-pressure pauses partitions and keeps polling (``flow``);
- SIGTERM: stop consuming, flush within ``SHUTDOWN_GRACE_SECONDS``, commit, close, exit 0.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.adapters.dlq import DeadLetterQueue
from service.adapters.executor import Executor
from service.adapters.kafka import AckedProducer, Consumer, LogReaderFactory
from service.adapters.ledger_store import LedgerStore
from service.app.settings import Settings
from service.clock import Clock
from service.core.breaker import PoisonBreaker
from service.core.budget import ImportBudget
from service.core.coalesce import Coalescer
from service.core.codec import EventDecoder
from service.core.lists import ListDirectory, ListNamer
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline import flow
from service.pipeline.commit import CommitSchedule, Committer
from service.pipeline.confirm import Confirmer
from service.pipeline.deliver import Delivery
from service.pipeline.desk import DeliverySettings, Desk
from service.pipeline.dispatch import Dispatcher
from service.pipeline.imports import ImportLifecycle
from service.pipeline.ownership import Ownership
from service.pipeline.rebalance import Rebalancer
from service.pipeline.source import POISON, SCHEMA, Source

logger = logging.getLogger(__name__)

CONSUME_BATCH = 500
BACKPRESSURE = "backpressure"


@dataclass
class Ports:
    """Everything the loop talks to. Real clients in production (``app/wiring.py``), the
    simulated cluster, account and clock in the simulation."""

    consumer: Consumer
    producer: AckedProducer
    readers: LogReaderFactory
    executor: Executor
    requests: Any  # the request budget: share, rate, waiting, paused_for, close
    decoder: EventDecoder
    clock: Clock
    rng: random.Random
    housekeeping: Callable[[float], None] = lambda now: None
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex


class Loop:
    def __init__(
        self, settings: Settings, ports: Ports, metrics: Metrics, hasher: Callable[[str], str]
    ) -> None:
        s, clock = settings, ports.clock
        self.settings, self.ports, self.metrics, self.clock = s, ports, metrics, clock
        self.topic, self.consumer = s.kafka_topic, ports.consumer
        self.ownership = Ownership()
        self.tracker = OffsetTracker()
        stale_tolerance_ms = (
            None
            if s.stale_event_tolerance_seconds is None
            else round(s.stale_event_tolerance_seconds * 1000)
        )
        self.coalescer = Coalescer(s.coalesce_window_seconds, stale_tolerance_ms)
        self.pauses = flow.Pauses(self.topic, self.consumer)
        self.ledger = LedgerStore(
            s.kafka_ledger_topic,
            ports.producer,
            ports.readers,
            clock=clock.monotonic,
            on_failure=metrics.ledger_write_failures.inc,
        )
        self.confirm = Confirmer(
            self.topic,
            self.coalescer,
            self.tracker,
            self.ledger,
            DeadLetterQueue(ports.producer, s.kafka_dlq_topic, clock.wall),
            self.ownership,
            metrics,
            hasher,
            clock.wall,
            ports.rng,
            retry_cap=s.retry_max_backoff_seconds,
            give_up_after=s.retry_give_up_seconds,
        )
        # A charge in flight is dated ahead by more than a request can take.
        budget = ImportBudget(
            s.ac_imports_per_minute, in_flight=max(60.0, 2 * s.ac_request_timeout_seconds)
        )
        self.dispatcher = Dispatcher(ports.executor, s.ac_concurrency)
        desk = Desk(
            DeliverySettings(
                s.ac_concurrency,
                s.ac_bulk_import,
                s.bulk_min_contacts,
                s.ac_create_lists,
                s.ac_list_sender_url,
                s.ac_list_sender_reminder,
                s.attribute_map,
                s.field_map,
                stale_tolerance_ms,
            ),
            self.coalescer,
            self.ledger,
            ListDirectory(verify_after=s.list_verify_seconds, max_lists=s.max_lists),
            self.dispatcher,
            self.confirm,
            self.ownership,
            metrics,
            clock.wall,
            clock.monotonic,
        )
        lifecycle = ImportLifecycle(
            budget,
            s.import_timeout_seconds,
            ports.rng,
            ports.new_id,
            give_up=s.import_give_up_seconds,
        )
        self.delivery = Delivery(desk, lifecycle)
        self.source = Source(
            self.topic,
            self.tracker,
            self.coalescer,
            ports.decoder,
            ListNamer(s.list_name_template, s.list_mapping),
            self.confirm,
            self.ownership,
            metrics,
            clock.wall,
            self.pauses.hold,
            self.pauses.release,
            self.delivery.want_list,
            expedite=s.coalesce_from_publish_time,
            breaker=PoisonBreaker(s.dlq_breaker_window, s.dlq_breaker_max_share),
        )
        self.committer = Committer(
            self.topic, self.consumer, self.tracker, metrics, clock.monotonic, clock.wall
        )
        self.schedule = CommitSchedule(s.commit_interval_seconds)
        self.rebalance = Rebalancer(
            self.topic,
            s.ac_rate_share == "partitions",
            self.consumer,
            self.ownership,
            self.pauses,
            self.tracker,
            self.coalescer,
            self.source,
            self.delivery,
            self.dispatcher,
            self.ledger,
            ports.producer,
            self.committer,
            budget,
            ports.requests,
            metrics,
            clock.monotonic,
            clock.sleep,
            s.revoke_deadline_seconds,
            self.turn,
        )
        self.bounds = flow.Bounds(s.max_pending_changes, s.max_tracked_offsets, s.max_pending_bytes)
        self.last_heartbeat = clock.monotonic()
        self._stop = threading.Event()

    # ---- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def on_kafka_error(self, error: Any) -> None:
        """librdkafka's ``error_cb``: broker reachability feeds readiness."""
        from confluent_kafka import KafkaError

        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.source.broker_ok = False

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        # The group coordinator answered: the broker is reachable (records may never come).
        self.source.broker_ok = True
        self.rebalance.on_assign(consumer, partitions)

    def run(self) -> int:
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self.rebalance.on_revoke,
            on_lost=self.rebalance.on_lost,
        )
        logger.info("consuming", extra={"topic": self.topic, "group": self.settings.kafka_group_id})
        try:
            while not self._stop.is_set():
                self.step()
            self.shutdown()
        finally:
            self.ports.executor.shutdown()
        return 0

    def step(self) -> None:
        """One loop iteration. Never blocks for more than a fraction of a second."""
        busy = bool(self.dispatcher.inflight) or len(self.coalescer) > 0
        messages = self.consumer.consume(CONSUME_BATCH, 0.05 if busy else 0.25)
        now = self.clock.monotonic()
        self.rebalance.settle(now)
        self.source.ingest(messages, now)
        self.source.retry_held(now)
        self.turn(now)
        self._backpressure()
        if self.schedule.due(now, self.idle()):
            # Periodically, and as soon as the work runs out: a drained backlog is committed
            # at once (a restart then repeats nothing), without a commit per change meanwhile.
            self.committer.commit(self.ownership.assigned)
            self._update_lag()
            self.schedule.done(now)
        self._heartbeat(now)
        self.ports.housekeeping(now)

    def turn(self, now: float, *, flush: bool = False) -> None:
        """The work of one turn after consuming: results, new work, acks."""
        for task, result in self.dispatcher.completed():
            self.delivery.completed(task, result, now)
        self.delivery.step(now, flush=flush)
        self.ports.producer.poll()

    def idle(self) -> bool:
        """Nothing pending, in flight or outstanding at AC: what completed can be committed."""
        return self.delivery.idle() and len(self.coalescer) == 0

    def shutdown(self) -> None:
        """Stop consuming, flush within the grace period, commit, close."""
        grace = self.settings.shutdown_grace_seconds
        deadline = self.clock.monotonic() + grace
        logger.info("shutting down", extra={"grace_seconds": grace, "pending": len(self.coalescer)})
        for partition in self.ownership.assigned:
            self.pauses.hold(partition, "shutdown")
        while self.clock.monotonic() < deadline and not self.idle():
            self.consumer.consume(CONSUME_BATCH, 0.05)  # keeps the group session alive; paused
            now = self.clock.monotonic()
            self.turn(now, flush=True)
            self._heartbeat(now)
        self.ports.producer.flush(max(0.5, deadline - self.clock.monotonic()), self.clock.monotonic)
        self.ports.requests.close()
        self.turn(self.clock.monotonic())
        self.committer.commit(self.ownership.assigned)
        self.rebalance.closing = True
        left = len(self.coalescer) + self.dispatcher.changes_in_flight()
        self.consumer.close()
        logger.info("stopped", extra={"changes_left_uncommitted": left})

    # ---- back-pressure and observation ---------------------------------------------------

    def _backpressure(self) -> None:
        owned = frozenset(self.ownership.assigned)
        load = flow.Load(
            len(self.coalescer) + self.dispatcher.changes_in_flight() + self.delivery.pending(),
            {p: self.tracker.outstanding(p) for p in owned},
            self.coalescer.raw_bytes,
        )
        decision = flow.decide(load, self.bounds, self.pauses.held(BACKPRESSURE), owned)
        for partition in decision.pause:
            self.pauses.hold(partition, BACKPRESSURE)
        for partition in decision.resume:
            self.pauses.release(partition, BACKPRESSURE)
        if decision.pause or decision.resume:
            logger.info(
                "back-pressure",
                extra={
                    "paused": sorted(decision.pause),
                    "resumed": sorted(decision.resume),
                    "pending": load.changes,
                },
            )
        self.metrics.paused_partitions.set(self.pauses.paused())

    def _update_lag(self) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        for partition in self.ownership.assigned:
            labels = (self.topic, str(partition))
            try:
                _low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(self.topic, partition), cached=True
                )
            except KafkaException:
                continue
            committed = self.committer.last.get(partition, -1)
            if high >= 0 and committed >= 0:
                self.metrics.consumer_lag.labels(*labels).set(max(0, high - committed))
            self.metrics.inflight_uncommitted.labels(*labels).set(
                self.tracker.outstanding(partition)
            )

    def _gauges(self) -> None:
        lifecycle = self.delivery.lifecycle
        self.metrics.imports_outstanding.set(lifecycle.outstanding())
        self.metrics.import_budget_left.set(lifecycle.budget.left(self.clock.wall()))
        self.metrics.changes_pending.set(len(self.coalescer) + self.delivery.pending())
        self.metrics.changes_inflight.set(self.dispatcher.changes_in_flight())

    def _heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        self.metrics.heartbeat.set(self.clock.wall())
        requests = self.ports.requests
        self.metrics.ratelimit_queue_depth.set(requests.waiting)
        self.metrics.ratelimit_rate.set(requests.rate)
        self.metrics.ratelimit_paused.set(1 if requests.paused_for() > 0 else 0)
        self._gauges()
        ok, _ = self.readiness()
        self.metrics.ready.set(1 if ok else 0)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = self.clock.monotonic() - self.last_heartbeat
        return age < 60.0, {"loop_age_seconds": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        paused_for = self.ports.requests.paused_for()
        detail = {
            "assigned_partitions": len(self.ownership.assigned),
            "broker_connected": self.source.broker_ok,
            "token_accepted": not self.confirm.gate.closed,
            "ledger_restoring_partitions": len(self.ownership.restoring),
            "schema_waiting_partitions": len(self.pauses.held(SCHEMA)),
            # Paused by the dead-letter breaker until a restart (README "Dead-letter breaker");
            # not a reason to be unready: the other partitions flow, and the alert pages.
            "dlq_breaker_open_partitions": sorted(self.pauses.held(POISON)),
            "ac_paused_seconds": round(paused_for, 1),
        }
        ready = (
            bool(self.ownership.assigned)
            and self.source.broker_ok
            and not self.confirm.gate.closed
            and not self.ownership.restoring
            and paused_for < 60.0
        )
        return ready, detail

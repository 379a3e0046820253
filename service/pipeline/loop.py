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

The stages and the ports they are built on are wired in ``stages.py``; back-pressure is applied
by ``backpressure.py``; the heartbeat, the gauges and the probes' answers are ``health.py``'s.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from service.app.settings import Settings
from service.metrics import Metrics
from service.pipeline.stages import Ports, build_stages

logger = logging.getLogger(__name__)

CONSUME_BATCH = 500


class Loop:
    def __init__(
        self, settings: Settings, ports: Ports, metrics: Metrics, hasher: Callable[[str], str]
    ) -> None:
        self.settings, self.ports, self.metrics, self.clock = settings, ports, metrics, ports.clock
        self.topic, self.consumer = settings.kafka_topic, ports.consumer
        stages = build_stages(settings, ports, metrics, hasher, self.turn)
        self.ownership = stages.ownership
        self.tracker = stages.tracker
        self.coalescer = stages.coalescer
        self.pauses = stages.pauses
        self.ledger = stages.ledger
        self.confirm = stages.confirm
        self.dispatcher = stages.dispatcher
        self.delivery = stages.delivery
        self.source = stages.source
        self.committer = stages.committer
        self.schedule = stages.schedule
        self.rebalance = stages.rebalance
        self.backpressure = stages.backpressure
        self.health = stages.health
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
        busy = (
            bool(self.dispatcher.inflight)
            or len(self.coalescer) > 0
            or bool(self.ownership.restoring)  # a restore or read-ahead runs between consumes
        )
        messages = self.consumer.consume(CONSUME_BATCH, 0.05 if busy else 0.25)
        now = self.clock.monotonic()
        self.rebalance.settle(now)
        self.source.ingest(messages, now)
        self.source.retry_held(now)
        self.turn(now)
        self.backpressure.apply()
        if self.schedule.due(now, self.idle()):
            # Periodically, and as soon as the work runs out: a drained backlog is committed
            # at once (a restart then repeats nothing), without a commit per change meanwhile.
            self.committer.commit(self.ownership.assigned)
            self.health.update_lag()
            self.schedule.done(now)
        self.health.heartbeat(now)
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
            self.health.heartbeat(now)
        self.ports.producer.flush(max(0.5, deadline - self.clock.monotonic()), self.clock.monotonic)
        self.ports.requests.close()
        self.turn(self.clock.monotonic())
        self.committer.commit(self.ownership.assigned)
        self.rebalance.closing = True
        left = len(self.coalescer) + self.dispatcher.changes_in_flight()
        self.consumer.close()
        logger.info("stopped", extra={"changes_left_uncommitted": left})

    # ---- probes (``service/app/health.py``) ---------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        return self.health.liveness()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.health.readiness()

"""What the loop shows of itself: the heartbeat, the gauges, the consumer lag, and the answers
to the liveness and readiness probes (served by ``service/app/health.py``).

- Liveness is only "the loop still iterates": the heartbeat is beaten every turn (and while
  shutting down), and the loop is alive while its last beat is under 60 s old. AC or Kafka
  being down never fails it.
- Readiness: partitions assigned, the broker reachable, the account accepted (the gate open),
  no ledger restoring, AC not pausing us for a minute or more. A partition paused by the
  dead-letter breaker is shown but does not make the replica unready.
- Observation only: nothing here changes what the stages do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.adapters.kafka import Consumer
from service.clock import Clock
from service.core.coalesce import Coalescer
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline.commit import Committer
from service.pipeline.confirm import Confirmer
from service.pipeline.deliver import Delivery
from service.pipeline.dispatch import Dispatcher
from service.pipeline.flow import Pauses
from service.pipeline.ownership import Ownership
from service.pipeline.source import POISON, SCHEMA, Source


@dataclass
class Health:
    """The heartbeat, the gauges and the probes' answers (read-only on the stages)."""

    topic: str
    consumer: Consumer
    requests: Any  # the request budget: rate, waiting, paused_for
    clock: Clock
    ownership: Ownership
    pauses: Pauses
    tracker: OffsetTracker
    coalescer: Coalescer
    dispatcher: Dispatcher
    delivery: Delivery
    source: Source
    confirm: Confirmer
    committer: Committer
    metrics: Metrics
    last_heartbeat: float = 0.0  # monotonic

    def update_lag(self) -> None:
        """The consumer lag and the uncommitted offsets of each owned partition (at a commit)."""
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

    def heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        self.metrics.heartbeat.set(self.clock.wall())
        requests = self.requests
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
        paused_for = self.requests.paused_for()
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

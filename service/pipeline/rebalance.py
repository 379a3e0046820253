"""Partitions arriving and leaving.

**Assign** (inside ``consume``, so nothing blocking here): a new generation, the partition
paused until its ledger is loaded. Right after that ``consume`` returns, ``settle`` reads the
committed offsets, takes the new share of the account's budgets (the partition count first,
then each partition's import history: a history is counted in units of 1/P), and starts the
ledger restore and the read-ahead of its backlog (``ahead.py``), which then advance a bounded
slice per loop turn. Once a partition's ledger is loaded, the imports its previous owner may
still have in flight (their intents) block their emails; once its backlog is read ahead too,
its records flow.

**Revoke** (cooperative: the next owner gets the partition only after this returns): drop the
pending changes, stop sending for the partition (in-flight requests finish), wait up to
``REVOKE_DEADLINE_SECONDS`` for its work in flight and its outstanding imports, flush its
ledger writes and dead letters, purge what was never sent (it can never land after the new
owner restored), commit its watermark, forget it, give up its share.

**Lost** (the group moved on without us): the same without waiting or committing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from service.adapters.kafka import AckedProducer, Consumer
from service.adapters.ledger_store import LedgerStore
from service.core.budget import ImportBudget
from service.core.coalesce import Coalescer
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline.ahead import ReadAhead
from service.pipeline.commit import Committer
from service.pipeline.deliver import Delivery
from service.pipeline.dispatch import Dispatcher
from service.pipeline.flow import Pauses
from service.pipeline.ownership import Ownership
from service.pipeline.source import RESTORING, Source

logger = logging.getLogger(__name__)

RESTORE_SLICE_SECONDS = 0.05  # of ledger reading per loop turn
AHEAD_SLICE_SECONDS = 0.2  # of reading a backlog ahead per loop turn (the loop waits for it)
SHARE_RETRY_SECONDS = 5.0


@dataclass
class Rebalancer:
    topic: str
    share_budgets: bool
    consumer: Consumer
    ownership: Ownership
    pauses: Pauses
    tracker: OffsetTracker
    coalescer: Coalescer
    source: Source
    delivery: Delivery
    dispatcher: Dispatcher
    ledger: LedgerStore
    acked: AckedProducer
    committer: Committer
    import_budget: ImportBudget
    requests: Any  # the request budget: share(owned, total)
    metrics: Metrics
    monotonic: Callable[[], float]
    sleep: Callable[[float], None]
    revoke_deadline: float
    turn: Callable[[float], None]  # one turn of the loop's work, without consuming
    closing: bool = False
    total_partitions: int = 0
    share_due_at: float | None = None  # when to (re)take the share; None: up to date
    new: set[int] = field(default_factory=set)  # assigned, committed offsets not read yet
    ahead: ReadAhead | None = None  # None: backlogs are not read ahead
    loaded: set[int] = field(default_factory=set)  # assigned, ledger loaded

    # ---- callbacks (inside consume(), on the loop's thread) ------------------------------

    def on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        mine = [tp.partition for tp in partitions if tp.topic == self.topic]
        self.ownership.assign(mine)
        for partition in mine:
            self.tracker.drop([partition])
            # A newly assigned partition starts unpaused: its records wait for its ledger.
            self.pauses.forget({partition})
            self.pauses.hold(partition, RESTORING)
        self.new.update(mine)
        self.loaded -= set(mine)
        # Committed offsets, the ledger and the share are settled right after this
        # ``consume()`` returns. Not here: a blocking client call inside a rebalance callback
        # clears confluent-kafka's per-call state, and the next callback of the same
        # ``consume()`` aborts the process (CallState_get assertion; seen when partitions move).
        self.share_due_at = 0.0
        self.metrics.assigned_partitions.set(len(self.ownership.assigned))
        logger.info("partitions assigned", extra={"partitions": sorted(mine)})

    def on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("revoke").inc()
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        if not self.closing:
            self.hand_over(gone)
        self._forget(gone)
        logger.info("partitions revoked", extra={"partitions": sorted(gone)})

    def on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("lost").inc()
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        self.dispatcher.cancel(gone)
        self.coalescer.discard(gone)
        self.acked.purge_unsent()  # never sent: it cannot land after the new owner's writes
        self._forget(gone)
        logger.warning(
            "partitions lost; their work is dropped uncommitted", extra={"partitions": sorted(gone)}
        )

    def hand_over(self, gone: set[int]) -> None:
        """Finish what is in flight for ``gone`` within the revoke deadline, then commit."""
        self.coalescer.discard(gone)
        self.dispatcher.cancel(gone)
        deadline = self.monotonic() + self.revoke_deadline
        while self.monotonic() < deadline and (
            self.dispatcher.working_on(gone)
            or self.delivery.lifecycle.touches(gone)
            or self.ledger.pending_writes(gone)
        ):
            self.sleep(0.02)
            self.turn(self.monotonic())
            self.coalescer.discard(gone)  # what was put back while draining
        self.acked.flush(max(0.1, deadline - self.monotonic()), self.monotonic)
        self.acked.purge_unsent()
        self.acked.poll()
        self.committer.commit(self.ownership.assigned, only=gone)

    def _forget(self, gone: set[int]) -> None:
        self.dispatcher.cancel(gone)
        self.delivery.forget(gone)
        self.ownership.revoke(gone)
        self.new -= gone
        self.loaded -= gone
        if self.ahead is not None and self.ahead.reading & gone:
            self.ahead.cancel(gone)
        self.source.forget(gone)
        self.pauses.forget(gone)
        self.ledger.forget(gone)
        self.metrics.ledger_emails.set(len(self.ledger.index))
        self.tracker.drop(gone)
        self.committer.forget(gone)
        for partition in gone:
            labels = (self.topic, str(partition))
            for gauge in (self.metrics.consumer_lag, self.metrics.inflight_uncommitted):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self.metrics.assigned_partitions.set(len(self.ownership.assigned))
        # Give up the revoked share at once (before another replica takes it), from the known
        # partition count: no blocking client call may run inside a rebalance callback.
        self._share(refresh=False, now=self.monotonic())

    # ---- after consume() returned ----------------------------------------------------------

    def settle(self, now: float) -> None:
        if self.share_due_at is not None and now >= self.share_due_at:
            self._share(refresh=True, now=now)
        if self.new:
            new = sorted(self.new & self.ownership.assigned)
            self.new.clear()
            tps = [TopicPartition(self.topic, p) for p in new]
            try:
                for tp in self.consumer.committed(tps, timeout=10):
                    self.committer.last[tp.partition] = tp.offset if tp.offset >= 0 else -1
            except KafkaException as exc:
                logger.warning("could not read committed offsets", extra={"error": str(exc)})
            self.ledger.start_restore(sorted(set(self.ledger.restoring) | set(new)))
            if self.ahead is not None:
                # Only from a known committed offset: the consumer starts there (or, none
                # committed, at the beginning: ``auto.offset.reset`` is earliest).
                starts = {p: self.committer.last[p] for p in new if p in self.committer.last}
                if starts:
                    self.ahead.start(starts)
        if self.ledger.restoring:
            stats = self.ledger.restore_step(RESTORE_SLICE_SECONDS)
            if stats is not None:
                self._restored(stats, now)
        if self.ahead is not None and self.ahead.reading:
            backlogs = self.ahead.step(AHEAD_SLICE_SECONDS)
            if backlogs is not None:
                for partition, backlog in backlogs.items():
                    if partition in self.ownership.assigned and backlog.informs():
                        self.source.ahead[partition] = backlog
                    self._flow(partition)

    def _restored(self, stats: Any, now: float) -> None:
        self.metrics.ledger_restore_seconds.observe(stats.seconds)
        self.metrics.ledger_restored_records.inc(stats.records)
        self.metrics.ledger_emails.set(len(self.ledger.index))
        logger.info(
            "ledger restored",
            extra={
                "partitions": stats.partitions,
                "records": stats.records,
                "emails": stats.emails,
                "repaired": stats.repaired,
                "seconds": round(stats.seconds, 3),
            },
        )
        for partition in stats.partitions:
            if partition not in self.ownership.assigned:
                continue
            # What the previous owner charged to this partition in AC's last minute (the share
            # was taken first: a history counts in units of one import / partition count).
            if self.share_budgets:
                self.import_budget.adopt(partition, self.ledger.budgets.get(partition, []))
            intents = self.ledger.intents.get(partition, [])
            if intents:
                self.delivery.lifecycle.adopt(
                    partition, intents, {partition: self.ownership.generation(partition)}, now
                )
                for intent in intents:
                    self.delivery.desk.adopted.update(intent.emails)
                logger.info(
                    "imports of the previous owner may still land; their emails wait",
                    extra={"partition": partition, "imports": len(intents)},
                )
            self.loaded.add(partition)
            self._flow(partition)

    def _flow(self, partition: int) -> None:
        """Let the partition's records flow once its ledger is loaded and its backlog read
        ahead (whichever comes last)."""
        if (
            partition in self.loaded
            and partition in self.ownership.restoring
            and not (self.ahead is not None and partition in self.ahead.reading)
        ):
            self.ownership.restored(partition)
            self.pauses.release(partition, RESTORING)

    def _share(self, *, refresh: bool, now: float) -> None:
        """Take the share of the account's budgets proportional to the partitions we own.
        ``refresh=False`` (inside a rebalance callback) uses the partition count learned last
        time. Until the count is known, nothing is owned (no request at all): a replica with
        the whole budget would collide with the others' ticks."""
        if not self.share_budgets:
            self.share_due_at = None
            return
        if refresh:
            try:
                metadata = self.consumer.list_topics(self.topic, timeout=5)
                self.total_partitions = len(metadata.topics[self.topic].partitions)
            except (KafkaException, KeyError, AttributeError):
                logger.warning("partition count unknown; no request until it is known")
                self.total_partitions = 0
        total = self.total_partitions
        owned = frozenset(self.ownership.assigned)
        self.requests.share(owned, total)
        if total > 0:
            self.import_budget.share(owned, total)
            self.share_due_at = None
        else:
            self.share_due_at = now + SHARE_RETRY_SECONDS
        logger.info(
            "rate share updated",
            extra={
                "owned_partitions": len(owned),
                "total_partitions": total,
                "requests_per_second": round(self.requests.rate, 3),
                "imports_per_minute": self.import_budget.capacity,
            },
        )

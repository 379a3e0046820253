"""Back-pressure, applied: the replica's load measured, ``flow.decide`` asked, partitions paused
and resumed (``flow.py`` holds the rule and its reasons).

The load is everything held in memory for the owned partitions: the changes pending (in the
coalescer, in flight, waiting in delivery), each partition's tracked offsets and the bytes of
the pending records. Only pauses of reason ``backpressure`` are taken or released here: a
partition paused for another reason (its ledger restoring, a schema, the dead-letter breaker,
shutdown) stays paused whatever the load. A paused partition's changes held for a later record
of their email are released here when that record cannot come soon. A paused partition keeps being polled, so the loop
never sleeps for long and the group session stays alive.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from service.core.coalesce import Coalescer
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline import flow
from service.pipeline.deliver import Delivery
from service.pipeline.dispatch import Dispatcher
from service.pipeline.ownership import Ownership

logger = logging.getLogger(__name__)

BACKPRESSURE = "backpressure"


@dataclass
class BackPressure:
    bounds: flow.Bounds
    ownership: Ownership
    pauses: flow.Pauses
    tracker: OffsetTracker
    coalescer: Coalescer
    dispatcher: Dispatcher
    delivery: Delivery
    metrics: Metrics

    def apply(self) -> None:
        """Measure the load, pause and resume partitions for it (once a loop turn)."""
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
        self._release_holds(load, owned)

    def _release_holds(self, load: flow.Load, owned: frozenset[int]) -> None:
        """A change held for a later record of its email (``Coalescer.add(hold=True)``) must
        not wait for a record that cannot come. Its partition is paused:
        - for another reason (a schema, the ledger restoring, the dead-letter breaker);
        - for its own share of the tracked offsets, or kept paused by them (over half the
          share: ``flow.decide``'s hysteresis). A stuck head: the held change itself keeps the
          partition's commit point back, so its offsets only grow while it waits. (Seen on
          the 500,000-event load: 221 held emails of one partition waited 76 s, until
          nothing else was left to send.)
        - for the replica's bound with nothing else queued or on its way (the holds keep the
          load over the bound). Work still on its way may yet lower the load: not before."""
        held = self.coalescer.held_partitions()
        if not held:
            return
        idle = self.coalescer.next_due_at() is None and self.delivery.idle()
        share = max(1, self.bounds.max_tracked // max(1, len(owned)))
        for partition in held:
            why = self.pauses.reasons.get(partition)
            stuck = load.tracked.get(partition, 0) > share // 2
            if why and (idle or stuck or why != {BACKPRESSURE}):
                released = self.coalescer.release_holds(partition)
                logger.info(
                    "held changes released: their partition is paused",
                    extra={"partition": partition, "emails": released, "paused": sorted(why)},
                )

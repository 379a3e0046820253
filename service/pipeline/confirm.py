"""What becomes of a change once AC answered: recorded, parked, retried, or held at the gate.

- **Recorded** (``recording.py``): the ledger entry is updated (decisions see it at once) and
  written; the change's source offsets complete only on the broker's ack of that write (or of a
  later one of the same email). A change that needed no request completes the same way, without
  a write when the entry is unchanged.
- **Parked** (``parking.py``): AC refused this change for good (or it kept failing while AC
  worked for others): the source record goes to the dead-letter topic with the reason; its
  offsets complete on the broker's ack.
- **Retried**: back to the coalescer after a capped exponential back-off with jitter (or AC's
  Retry-After). A newer event for the key replaces it and starts afresh.
- **The gate**: AC refuses the account (token, URL): every change waits, nothing is parked, one
  probe at a time checks whether it is fixed; the gate opens only when a request succeeds.
- Before a write leaves, the ledger announces it (``pending``), and what is later known of AC
  settles it (``write_ahead.py``).

Every result is applied only if its partition is still owned in the same generation as when
the work started (``Ownership.owns``). An ``Observer`` (the dry run's report) sees each change
recorded and each record parked.

``Confirmer`` is the one object the stages call for all of it: it holds the state (ledger,
tracker, gate, ...) and takes its recording, write-ahead and parking from ``Recording``,
``WriteAhead`` and ``Parking``, each of which declares the attributes it uses. This module
routes the outcomes (``settle``, ``failed``) and keeps the retries and the gate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.adapters.dlq import DeadLetterQueue
from service.adapters.ledger_store import LedgerStore
from service.core.backoff import backoff_delay
from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.errors import ApiError, PermanentApiError
from service.core.offsets import OffsetTracker
from service.core.outcome import Outcome, OutcomeKind, outcome_for_error
from service.metrics import Metrics
from service.pipeline.ownership import Ownership
from service.pipeline.parking import Parking
from service.pipeline.recording import Observer, Recording
from service.pipeline.write_ahead import WriteAhead

logger = logging.getLogger(__name__)

GATE_PROBE_SECONDS = 15.0


@dataclass
class Gate:
    """AC refuses the account: all sending stops; one probe every ``probe_every`` seconds."""

    probe_every: float = GATE_PROBE_SECONDS
    closed: bool = False
    probe_at: float = 0.0
    reason: str = ""

    def close(self, now: float, reason: str) -> None:
        self.closed = True
        self.reason = reason
        self.probe_at = max(self.probe_at, now + self.probe_every)

    def may_probe(self, now: float) -> bool:
        return now >= self.probe_at

    def probed(self, now: float) -> None:
        self.probe_at = now + self.probe_every


@dataclass
class Confirmer(Recording, WriteAhead, Parking):
    topic: str
    coalescer: Coalescer
    tracker: OffsetTracker
    ledger: LedgerStore
    dlq: DeadLetterQueue
    ownership: Ownership
    metrics: Metrics
    hasher: Callable[[str], str]
    wall: Callable[[], float]
    rng: random.Random
    retry_cap: float
    give_up_after: float
    gate: Gate = field(default_factory=Gate)
    last_success: float = float("-inf")  # monotonic: when AC last confirmed any change
    forgotten_contacts: set[str] = field(default_factory=set)  # ledger ids AC no longer has
    observer: Observer | None = None

    # ---- outcomes ------------------------------------------------------------------------

    def settle(
        self,
        outcomes: list[Outcome],
        generation: int,
        now: float,
        *,
        fields_hash: int | None = None,
        list_ids: Mapping[ListRef, str] | None = None,
    ) -> None:
        """The outcomes of one email's per-contact work."""
        applied = [o for o in outcomes if o.kind is OutcomeKind.APPLIED]
        if applied:
            self.last_success = now
            contact_id = next((o.contact_id for o in applied if o.contact_id), None)
            self.record(
                [o.change for o in applied],
                {i: o.known for i, o in enumerate(applied)},
                generation,
                contact_id=contact_id,
                fields_hash=fields_hash,
                list_ids=list_ids,
            )
        for outcome in outcomes:
            if outcome.kind is not OutcomeKind.APPLIED:
                self.failed(outcome, generation, now)

    # ---- not applied ---------------------------------------------------------------------

    def failed(self, outcome: Outcome, generation: int, now: float) -> None:
        change = outcome.change
        if not self.ownership.owns(change.partition, generation):
            return
        if outcome.contact_gone:
            self.forgotten_contacts.add(change.email)
        if outcome.kind is OutcomeKind.PERMANENT:
            assert isinstance(outcome.error, PermanentApiError)
            self.clear_pending([change], generation)  # AC refused it: nothing landed
            self.park(change, outcome.error, generation)
        elif outcome.kind is OutcomeKind.BLOCKED:
            if not self.gate.closed:
                logger.error(
                    "ActiveCampaign refuses the account: all sending stops until it accepts it",
                    extra={"ac_status": outcome.error.status if outcome.error else None},
                )
            self.gate.close(now, type(outcome.error).__name__ if outcome.error else "blocked")
            self.metrics.auth_rejected.set(1)
            self.coalescer.requeue(change, self.gate.probe_at)
        else:
            self.retry(outcome, generation, now)

    def retry(self, outcome: Outcome, generation: int, now: float) -> None:
        change = outcome.change
        if change.failing_since is None:
            change.failing_since = now
        elif (
            now - change.failing_since > self.give_up_after
            and self.last_success > change.failing_since
        ):
            # AC has worked for other changes all along; this one keeps failing: park it with
            # its reason rather than hold its partition's commit point for ever.
            error = outcome.error or ApiError(None, "failed")
            self.park(
                change,
                PermanentApiError(error.status, "retries_exhausted", error.detail),
                generation,
                reason="retries_exhausted",
            )
            return
        change.attempts += 1
        delay = backoff_delay(change.attempts - 1, self.rng.random(), cap=self.retry_cap)
        delay = max(delay, outcome.retry_after)
        reason = "rate_limited" if outcome.retry_after else "transient"
        self.metrics.ac_retries.labels(reason).inc()
        self.coalescer.requeue(change, now + delay)

    def fail_all(
        self, changes: list[PendingChange], error: ApiError, generation: int, now: float
    ) -> None:
        for change in changes:
            self.failed(outcome_for_error(change, error), generation, now)

    def requeue(
        self, changes: list[PendingChange], stamp: Mapping[int, int], now: float, *, single: bool
    ) -> None:
        for change in changes:
            if self.ownership.owns(change.partition, stamp.get(change.partition, -1)):
                change.force_single = change.force_single or single
                self.coalescer.requeue(change, now)

    def opened(self) -> None:
        """A request succeeded: the account works again."""
        if self.gate.closed:
            logger.info("ActiveCampaign accepts the account again")
        self.gate.closed = False
        self.metrics.auth_rejected.set(0)

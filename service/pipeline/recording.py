"""Recording what AC now holds: the ledger entry of one email, updated, and its offsets complete.

- The entry is updated at once (decisions see it) and written; the change's source offsets
  complete only on the broker's ack of that write (or, when the entry is unchanged, of what the
  ledger already shows for the email): never before the record is durable.
- A change that needed no request (``SKIP``, ``STALE``) completes the same way: the newest event
  is recorded as the state it repeats (an exit of a contact never ours as ``EXIT_SEEN``), so an
  older event sent again later is stale beside it; a replay of records the ledger covers
  already changes nothing.
- A result is applied only if its partition is still owned in the same generation as when the
  work started (``Ownership.owns``), when it is recorded and again when the write is acked.

``Recording`` is a part of ``Confirmer`` (``confirm.py``): the attributes it declares are the
confirmer's. An ``Observer`` (the dry run's report) sees each change recorded and each record
parked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from service.adapters.ledger_store import LedgerStore
from service.core.coalesce import ListRef, PendingChange
from service.core.ledger import EXIT_SEEN, Known, LedgerEntry, ListState, Plan, merged
from service.core.model import Action
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline.ownership import Ownership

logger = logging.getLogger(__name__)


class Observer(Protocol):
    """Sees what becomes of every change (``run --dry-run``'s report)."""

    def recorded(
        self,
        change: PendingChange,
        known: Known | None,
        list_id: str | None,
        contact_id: str | None,
    ) -> None: ...

    def parked(self, change: PendingChange | None, reason: str, key: bytes | None) -> None: ...


class Recording:
    """Records what AC now holds for one email's changes; offsets complete on the ledger's ack."""

    ledger: LedgerStore
    tracker: OffsetTracker
    ownership: Ownership
    metrics: Metrics
    hasher: Callable[[str], str]
    wall: Callable[[], float]
    forgotten_contacts: set[str]  # ledger ids AC no longer has
    observer: Observer | None

    def record(
        self,
        changes: list[PendingChange],
        known: Mapping[int, Known | None],
        generation: int,
        *,
        contact_id: str | None = None,
        fields_hash: int | None = None,
        list_ids: Mapping[ListRef, str] | None = None,
    ) -> None:
        """One email's changes (one partition) that AC now holds (``known[i]`` for
        ``changes[i]``; None: the state is unchanged). Offsets complete on the ledger's ack."""
        if not changes:
            return
        email, partition = changes[0].email, changes[0].partition
        if not self.ownership.owns(partition, generation):
            return  # the partition moved on: the new owner repeats the work
        entry = self.ledger.get(partition, email)
        applied_ms = int(self.wall() * 1000)
        states: list[ListState] = []
        applied: list[PendingChange] = []
        for index, change in enumerate(changes):
            state = known.get(index)
            if self.observer is not None:
                self.observer.recorded(
                    change, state, (list_ids or {}).get(change.target), contact_id
                )
            if change.plan is Plan.CONSENT_KEPT or (
                state is not None and state.status == 2 and change.event.action.status == 1
            ):
                self.metrics.consent_kept.inc()
                logger.info(
                    "the person's own unsubscribe is kept",
                    extra={"email_hash": self.hasher(email), "partition": partition},
                )
            if state is None:
                unchanged = self._unchanged(email, change)
                if unchanged is not None:
                    states.append(self._state(change, unchanged, applied_ms, list_ids))
                continue
            if state.status == change.event.action.status:
                applied.append(change)
            states.append(self._state(change, state, applied_ms, list_ids))
        if contact_id:
            self.forgotten_contacts.discard(email)
        new_entry = merged(entry, states, contact_id, fields_hash or None)

        def written() -> None:
            if not self.ownership.owns(partition, generation):
                return  # the partition moved on; the new owner restores this write
            for change in changes:
                for offset in change.offsets:
                    self.tracker.complete(change.partition, offset)
            for change in applied:
                self.metrics.changes_applied.labels(change.event.action.value.lower()).inc()
                age = self.wall() - change.event.occurred_at_ms / 1000.0
                self.metrics.event_to_applied.observe(max(0.0, age))

        if new_entry == entry or (entry is None and new_entry == LedgerEntry(None, 0, ())):
            # Nothing new to record (a replay, an exit of a contact never ours): done once what
            # the index already shows for the email is on the broker.
            self.ledger.when_written(partition, email, written)
            return
        self.metrics.ledger_writes.inc()
        self.ledger.write(partition, email, new_entry, written)

    def _unchanged(self, email: str, change: PendingChange) -> Known | None:
        """A change AC was not asked to set: counted, and what to record for it (None:
        nothing). Nothing was sent, but the newest event is recorded (an exit of a contact
        never ours as such; a duplicate as the state it repeats): an older event sent again
        later (a redrive, a late re-send) is then stale beside it. A replay of records the
        ledger covers already changes nothing."""
        previous = change.previous
        if change.plan is Plan.SKIP:
            self.metrics.changes_skipped.labels("already_applied").inc()
            if previous is None and change.event.action is Action.EXITED:
                return EXIT_SEEN
            if previous is not None and not _replay(change, previous):
                return Known(previous.status, previous.set_by, previous.verified)
        elif change.plan is Plan.STALE:
            self.metrics.changes_skipped.labels("stale").inc()
            logger.info(
                "change skipped: older than the event the ledger applied",
                extra={
                    "email_hash": self.hasher(email),
                    "partition": change.partition,
                    "offset": change.offsets[-1],
                    "list": change.target.label(),
                },
            )
        return None

    @staticmethod
    def _state(
        change: PendingChange,
        known: Known,
        applied_ms: int,
        list_ids: Mapping[ListRef, str] | None,
    ) -> ListState:
        event = change.event
        return ListState(
            change.target.label(),
            known.status,
            known.set_by,
            event.event_id,
            event.occurred_at_ms,
            applied_ms,
            change.partition,
            change.offsets[-1],
            event.audience_id,
            event.audience_name,
            event.campaign_id,
            event.treatment_group,
            known.verified,
            (list_ids or {}).get(change.target),
        )


def _replay(change: PendingChange, state: ListState) -> bool:
    """The change's records are ones the state already covers (read again after a crash)."""
    return (
        change.partition == state.source_partition
        and change.offsets[-1] <= state.source_offset
        and change.event.occurred_at_ms <= state.event_time_ms
    )

"""What becomes of a change once AC answered: recorded, parked, retried, or held at the gate.

- **Recorded**: the ledger entry is updated (decisions see it at once) and written; the change's
  source offsets complete only on the broker's ack of that write (or of a later one of the same
  email). A change that needed no request completes the same way, without a write when the
  entry is unchanged.
- **Parked**: AC refused this change for good (or it kept failing while AC worked for others):
  the source record goes to the dead-letter topic with the reason; its offsets complete on the
  broker's ack.
- **Retried**: back to the coalescer after a capped exponential back-off with jitter (or AC's
  Retry-After). A newer event for the key replaces it and starts afresh.
- **The gate**: AC refuses the account (token, URL): every change waits, nothing is parked, one
  probe at a time checks whether it is fixed; the gate opens only when a request succeeds.

Every result is applied only if its partition is still owned in the same generation as when
the work started (``Ownership.owns``). An ``Observer`` (the dry run's report) sees each change
recorded and each record parked.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from service.adapters.dlq import DeadLetter, DeadLetterQueue
from service.adapters.ledger_store import LedgerStore
from service.core.backoff import backoff_delay
from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.errors import ApiError, PermanentApiError, PoisonMessage
from service.core.ledger import (
    EXIT_SEEN,
    SUBSCRIBED_BY_IMPORT,
    UNSUBSCRIBED_BY_US,
    Known,
    LedgerEntry,
    ListState,
    Plan,
    SetBy,
    merged,
    with_pending,
)
from service.core.model import Action
from service.core.offsets import OffsetTracker
from service.core.outcome import Outcome, OutcomeKind, outcome_for_error
from service.metrics import Metrics
from service.pipeline.ownership import Ownership

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


@dataclass
class Confirmer:
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

    # ---- recorded ------------------------------------------------------------------------

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

    # ---- write-ahead -------------------------------------------------------------------------

    def write_pending(
        self,
        changes: list[PendingChange],
        generation: int,
        list_ids: Mapping[ListRef, str],
        on_written: Callable[[], None],
        *,
        via_import: bool = False,
    ) -> bool:
        """Before AC is asked to set a status, record that it is about to be set (``pending``):
        a crash before the outcome is recorded then leaves the state *uncertain* in the ledger
        (the next owner asks AC first) instead of wrong. ``on_written`` runs on the broker's
        ack. False when nothing needed announcing (``on_written`` is not called)."""
        if not changes:
            return False
        email, partition = changes[0].email, changes[0].partition
        if not self.ownership.owns(partition, generation):
            return False
        entry = self.ledger.get(partition, email)
        states: list[ListState] = []
        for change in changes:
            target = _target(change.plan, change.event.action.status)
            if target == 0:
                continue
            label = change.target.label()
            current = entry.state(label) if entry else None
            pending = with_pending(current.pending if current else 0, target, via_import=via_import)
            # When an unsubscribe of ours was first announced (AC's udate is compared with it):
            # kept while one is pending, so a later announcement never moves it forward.
            since = current.pending_since_ms if current is not None and current.pending else 0
            if target == 2 and not (current is not None and 2 in current.pending_statuses):
                since = int(self.wall() * 1000)
            if current is not None:
                states.append(current._replace(pending=pending, pending_since_ms=since))
            else:
                # A new state (nothing of ours there, or a write-ahead taken back): dated by
                # this change's record and now, so a restore's merge (``newest``) puts it after
                # whatever the ledger held for the list before, whatever the log order.
                event = change.event
                states.append(
                    ListState(
                        label,
                        0,
                        SetBy.UNKNOWN,
                        event.event_id,
                        event.occurred_at_ms,
                        int(self.wall() * 1000),
                        change.partition,
                        max(change.offsets[-1], _raw_offset(entry, label)),
                        event.audience_id,
                        event.audience_name,
                        event.campaign_id,
                        event.treatment_group,
                        False,
                        list_ids.get(change.target),
                        pending,
                        since,
                    )
                )
        if not states:
            return False
        self.ledger.write(partition, email, merged(entry, states, None, None), on_written)
        return True

    def resolve(
        self,
        email: str,
        partition: int,
        generation: int,
        known: Mapping[str, Known | None],
        contact_id: str | None,
    ) -> None:
        """Uncertain states (``pending``) resolved by reading AC: ``known`` by list label. The
        event a state records is kept (nothing new was applied); the change is decided again."""
        if not self.ownership.owns(partition, generation):
            return
        entry = self.ledger.get(partition, email)
        if entry is None:
            return
        lists = []
        for state in entry.lists:
            if state.list not in known or not state.pending:
                lists.append(state)
                continue
            now_known = known[state.list]
            if now_known is None:
                lists.append(state._replace(status=0, pending=0, pending_since_ms=0))
            else:
                lists.append(
                    state._replace(
                        status=now_known.status,
                        set_by=now_known.set_by,
                        verified=now_known.verified,
                        pending=0,
                        pending_since_ms=0,
                    )
                )
        resolved = entry._replace(lists=tuple(lists), contact_id=contact_id or entry.contact_id)
        if resolved != entry:
            self.ledger.write(partition, email, resolved, lambda: None)

    def landed(self, email: str, partition: int, generation: int) -> None:
        """A previous owner's import reached AC: a state it announced (pending, through an
        import, one status) now holds what the import set. A state with any other write
        pending stays uncertain (it is read from AC before anything is decided)."""
        if not self.ownership.owns(partition, generation):
            return
        entry = self.ledger.get(partition, email)
        if entry is None:
            return
        lists = []
        for listed in entry.lists:
            state = listed
            if state.pending_import and len(state.pending_statuses) == 1:
                known = SUBSCRIBED_BY_IMPORT if 1 in state.pending_statuses else UNSUBSCRIBED_BY_US
                state = state._replace(
                    status=known.status,
                    set_by=known.set_by,
                    verified=known.verified,
                    pending=0,
                    pending_since_ms=0,
                )
            lists.append(state)
        landed = entry._replace(lists=tuple(lists))
        if landed != entry:
            self.ledger.write(partition, email, landed, lambda: None)

    def remember_contact(
        self, email: str, partition: int, generation: int, contact_id: str
    ) -> None:
        """Keep a contact id learned from AC in the email's entry (if it has one)."""
        if not self.ownership.owns(partition, generation):
            return
        entry = self.ledger.get(partition, email)
        if entry is not None and entry.contact_id != contact_id:
            self.ledger.write(partition, email, entry._replace(contact_id=contact_id), lambda: None)

    def clear_pending(self, changes: list[PendingChange], generation: int) -> None:
        """The write was refused for sure (it never reached AC's data): the state is what it
        was before the write-ahead."""
        if not changes:
            return
        email, partition = changes[0].email, changes[0].partition
        if not self.ownership.owns(partition, generation):
            return
        entry = self.ledger.get(partition, email)
        if entry is None:
            return
        labels = {c.target.label() for c in changes}
        # A state that was only the write-ahead (status 0) stays as a marker of "none": a
        # restore merges records per list, and a dropped state would come back from the older
        # record.
        kept = tuple(
            s._replace(pending=0, pending_since_ms=0) if s.list in labels and s.pending else s
            for s in entry.lists
        )
        if kept != entry.lists:
            self.ledger.write(partition, email, entry._replace(lists=kept), lambda: None)

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

    # ---- parked ---------------------------------------------------------------------------

    def park(
        self,
        change: PendingChange,
        error: PermanentApiError,
        generation: int,
        *,
        reason: str | None = None,
    ) -> None:
        logger.info(
            "ActiveCampaign refused a change; to dead-letter topic",
            extra={
                "email_hash": self.hasher(change.email),
                "ac_status": error.status,
                "ac_code": error.code,
                "partition": change.partition,
            },
        )
        reason = reason or ("list_missing" if error.code == "list_missing" else "ac_rejected")
        if self.observer is not None:
            self.observer.parked(change, reason, None)
        letter = DeadLetter(
            change.email.encode(),
            change.raw,
            reason,
            type(error).__name__,
            error.detail,
            self.topic,
            change.partition,
            change.offsets[-1],
            covered_offsets=tuple(change.offsets),
            ac_status=error.status,
            ac_code=error.code,
            extra_headers=tuple(change.headers or ()),
        )
        self._send(letter, change.partition, generation, tuple(change.offsets))

    def park_record(
        self,
        key: bytes | None,
        value: bytes | None,
        partition: int,
        offset: int,
        poison: PoisonMessage,
        generation: int,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if self.observer is not None:
            self.observer.parked(None, poison.reason, key)
        letter = DeadLetter(
            key,
            value,
            poison.reason,
            type(poison).__name__,
            poison.detail,
            self.topic,
            partition,
            offset,
            extra_headers=tuple(headers or ()),
        )
        self._send(letter, partition, generation, (offset,))

    def _send(
        self, letter: DeadLetter, partition: int, generation: int, offsets: tuple[int, ...]
    ) -> None:
        def parked() -> None:
            if not self.ownership.owns(partition, generation):
                return
            self.metrics.dlq_records.labels(letter.reason).inc()
            for offset in offsets:
                self.tracker.complete(partition, offset)

        self.dlq.send(letter, parked)


def _raw_offset(entry: LedgerEntry | None, label: str) -> int:
    """The source offset the entry records for the list, also for a state ``state()`` hides."""
    return (
        max((s.source_offset for s in entry.lists if s.list == label), default=-1) if entry else -1
    )


def _replay(change: PendingChange, state: ListState) -> bool:
    """The change's records are ones the state already covers (read again after a crash)."""
    return (
        change.partition == state.source_partition
        and change.offsets[-1] <= state.source_offset
        and change.event.occurred_at_ms <= state.event_time_ms
    )


def _target(plan: Plan, action_status: int) -> int:
    """The status a change may set in AC (0: it sets none)."""
    if plan in (Plan.FIRST_ENTRY, Plan.RESUBSCRIBE):
        return 1
    if plan in (Plan.UNSUBSCRIBE, Plan.EXIT):
        return 2
    return 0

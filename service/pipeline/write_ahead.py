"""The ledger's write-ahead: what may be about to change in AC, and what settles it.

- Before AC is asked to set a status, the email's entry records that it is about to be set
  (``pending``, per list), and the request leaves only on the broker's ack: a crash before the
  outcome is recorded then leaves the state *uncertain* in the ledger (the next owner asks AC
  first), never wrong.
- A pending state is settled by what becomes known of AC: the outcome recorded
  (``recording.py``), AC read (``resolve``), a previous owner's import landed (``landed``: only
  a state announced through an import with one status), or a write refused for sure
  (``clear_pending``: the state is what it was before the write-ahead).
- The entry also remembers the contact id AC gave the email (``remember_contact``).
- Nothing is written for a partition no longer owned in the generation the work started in
  (``Ownership.owns``).

``WriteAhead`` is a part of ``Confirmer`` (``confirm.py``): the attributes it declares are the
confirmer's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from service.adapters.ledger_store import LedgerStore
from service.core.coalesce import ListRef, PendingChange
from service.core.ledger import (
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
from service.pipeline.ownership import Ownership


class WriteAhead:
    """Announces writes in the ledger before they leave, and settles them (``pending``)."""

    ledger: LedgerStore
    ownership: Ownership
    wall: Callable[[], float]

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


def _raw_offset(entry: LedgerEntry | None, label: str) -> int:
    """The source offset the entry records for the list, also for a state ``state()`` hides."""
    return (
        max((s.source_offset for s in entry.lists if s.list == label), default=-1) if entry else -1
    )


def _target(plan: Plan, action_status: int) -> int:
    """The status a change may set in AC (0: it sets none)."""
    if plan in (Plan.FIRST_ENTRY, Plan.RESUBSCRIBE):
        return 1
    if plan in (Plan.UNSUBSCRIBE, Plan.EXIT):
        return 2
    return 0

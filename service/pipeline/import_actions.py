"""What the import lifecycle (``service/pipeline/imports.py``) follows and what it returns.

- The imports it follows: ``Import`` (its emails per partition: the intents written ahead; its
  ``State``; the generation stamp it was taken under) and its ``Group``s (one email's changes,
  all from one partition).
- The actions it returns, which the loop carries out in order (``importing.py``): write or
  delete an intent, write a partition's import-budget history, record what a completed import
  set, requeue, fail, release emails, settle a previous owner's import (``Landed``), learn
  contact ids (``Learn``).

Plain values and one pure function (``completed``: what AC's answer for a completed import
means); no clock, no I/O, no state of the lifecycle's own. The actions that apply to changes or
emails (``Record``, ``Requeue``, ``Fail``, ``Landed``, ``Learn``) carry the generations their
import was taken under: whoever carries them out applies them only to partitions still owned in
that generation (``Ownership.owns``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from service.adapters.ledger_store import Intent
from service.core.acapi import ImportStatus
from service.core.coalesce import PendingChange
from service.core.errors import ApiError
from service.core.ledger import SUBSCRIBED_BY_IMPORT, UNSUBSCRIBED_BY_US, Known, Plan


class State(enum.Enum):
    PREPARING = "preparing"  # intents and budget history written, waiting for the acks
    SUBMITTING = "submitting"  # the bulk_import request is on its way
    QUEUED = "queued"  # AC gave a batch id: polling import/info
    UNKNOWN = "unknown"  # it may or may not be queued: waiting for AC's summary


@dataclass
class Group:
    """One email's changes in an import (all from one partition)."""

    email: str
    partition: int
    changes: list[PendingChange]


@dataclass
class Import:
    import_id: str
    groups: list[Group]  # empty for an adopted intent (only its emails are known)
    entries: list[dict[str, Any]]
    stamp: dict[int, int]  # partition -> generation when taken
    emails: dict[int, tuple[str, ...]]  # partition -> emails (the intents)
    started: float  # monotonic
    state: State = State.PREPARING
    charge: int = 0
    acks_due: int = 0
    batch_id: str | None = None
    next_poll_at: float = 0.0
    polls: int = 0
    queued_at: float = 0.0  # monotonic: when AC answered its submission with a batch id
    processing_at: float = 0.0  # seconds after ``queued_at`` of the last "still processing"
    adopted: bool = False  # restored from a previous owner's intent

    @property
    def partitions(self) -> set[int]:
        return set(self.emails)

    def all_emails(self) -> set[str]:
        return {e for emails in self.emails.values() for e in emails}


# ---- actions the loop carries out ------------------------------------------------------------


@dataclass
class WriteIntent:
    partition: int
    intent: Intent
    import_id: str


@dataclass
class DeleteIntent:
    partition: int
    intent_id: str


@dataclass
class WriteBudget:
    partition: int
    history: list[tuple[float, float]]


@dataclass
class Record:
    """The import completed: these changes now hold ``known`` in AC (or failed per email)."""

    group: Group
    known: dict[int, Known | None]  # index into group.changes -> what AC holds
    stamp: dict[int, int]


@dataclass
class Requeue:
    changes: list[PendingChange]
    stamp: dict[int, int]
    force_single: bool = False
    not_queued: bool = False  # AC surely did not take them: their write-ahead is void
    abandoned: bool = False  # given up on (IMPORT_GIVE_UP_SECONDS): it may still land


@dataclass
class Fail:
    """Every change of the import gets this error (refused for good, or a blocked account):
    AC did not take them."""

    changes: list[PendingChange]
    error: ApiError
    stamp: dict[int, int]


@dataclass
class Release:
    emails: set[str]


@dataclass
class Landed:
    """A previous owner's import completed: its emails' states announced through it (pending,
    by import) are what AC now holds, except for the emails AC reports as failed."""

    partition: int
    emails: tuple[str, ...]
    failed: set[str]
    generation: int


@dataclass
class Learn:
    """An import completed: AC created (or found) contacts with these ids for these emails, in
    an order it does not document. Worth learning which is whose (an exit is then asked about
    by id, a hundred to a request) when a request slot is free."""

    ids: list[str]
    emails: dict[str, tuple[int, int]]  # email -> (partition, generation)


Action = (
    WriteIntent | DeleteIntent | WriteBudget | Record | Requeue | Fail | Release | Landed | Learn
)


def completed(imp: Import, status: ImportStatus) -> list[Action]:
    """What AC's answer for a completed import means: the changes of each email it took
    hold what the import set (``Record``), the emails AC reports as failed go back for the
    per-contact path, and a previous owner's import settles its emails' pending states
    (``Landed``). The lifecycle then closes the import (its intents deleted, its emails
    released)."""
    failed = {e.strip().lower() for e in status.failed_emails}
    actions: list[Action] = []
    retry: list[PendingChange] = []
    for group in imp.groups:
        if group.email in failed:
            # AC gives no reason: the per-contact path learns it (and parks it if permanent).
            retry += group.changes
            continue
        known: dict[int, Known | None] = {}
        for index, change in enumerate(group.changes):
            if change.plan is Plan.FIRST_ENTRY:
                known[index] = SUBSCRIBED_BY_IMPORT
            elif change.plan is Plan.UNSUBSCRIBE:
                known[index] = UNSUBSCRIBED_BY_US
            else:
                known[index] = None  # rode along for the fields: the state is unchanged
        actions.append(Record(group, known, imp.stamp))
    if status.success_ids and not imp.adopted:
        # One (partition, generation) tuple per partition, not per email: the ids wait to be
        # learned for minutes during a drain, ~100,000 emails of them on a first load.
        where = {p: (p, imp.stamp.get(p, -1)) for p in {g.partition for g in imp.groups}}
        emails = {g.email: where[g.partition] for g in imp.groups if g.email not in failed}
        actions.append(Learn(list(status.success_ids), emails))
    if retry:
        # AC reports these emails as failed: nothing of the import reached them.
        actions.append(Requeue(retry, imp.stamp, force_single=True, not_queued=True))
    if imp.adopted:
        # A previous owner's import: no changes of ours ride on it, but its emails' pending
        # states can be settled from its outcome (no read of each contact needed).
        actions += [
            Landed(p, emails, failed, imp.stamp.get(p, -1)) for p, emails in imp.emails.items()
        ]
    return actions

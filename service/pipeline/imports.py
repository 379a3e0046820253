"""The import lifecycle, as a state machine that takes ``now`` and returns actions.

::

    prepare ──► PREPARING ──(intents and budget acked)──► SUBMITTING ──► QUEUED ──► completed
                                                            │              │  (import/info)
                                                            │ unknown       │ 404, or no answer
                                                            ▼ outcome       ▼ past the timeout
                                                          UNKNOWN ◄─────────┘
                                                            │ AC reports no import outstanding
                                                            ▼
                                                          resent: the changes go back, nothing
                                                          older can land any more

    An import AC still reports processing (QUEUED), or outstanding (UNKNOWN), keeps its emails
    until IMPORT_GIVE_UP_SECONDS (default an hour); then its changes are resent and its emails
    released all the same (counted, logged as an error): the one bounded window in which an
    old import may land after a newer change.

The rule that shapes it: **an import may land in AC long after it was sent** (AC processes
imports asynchronously), so an email whose import outcome is unknown gets no newer write until
the outcome is known, and that knowledge must survive a crash and a rebalance. So, before an
import is sent, an *intent* (the emails of each partition it carries, and later its batch id)
is written to each partition's ledger together with the partition's import-budget history, and
the import leaves only once the broker acknowledged them (write-ahead). The intent is deleted
(a tombstone) once the import's outcome is recorded. A new owner of the partition (after a
crash or a revoke) adopts the intents it restores: their emails stay blocked until it knows the
import completed (``import/info``) or that nothing is outstanding at AC any more
(``GET /import/bulk_import``), then its changes are sent again from the source topic.

When the outcome is known to be "not queued" (AC refused the request, or its per-minute import
limit), the changes go back at once. When the request may or may not have been queued (a
timeout, a 5xx, a dropped connection), the import is UNKNOWN: resolved by AC's summary.

The imports it follows (``Import``, ``Group``, ``State``), the actions it returns and what a
completed import's answer means (``completed``) are in ``service/pipeline/import_actions.py``.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.adapters.ledger_store import Intent
from service.core.acapi import ImportStatus
from service.core.backoff import backoff_delay
from service.core.budget import ImportBudget
from service.core.bulk import Submitted, learn_expected, next_poll_delay
from service.core.errors import PermanentApiError, RateLimited
from service.pipeline.import_actions import (
    Action,
    DeleteIntent,
    Fail,
    Group,
    Import,
    Release,
    Requeue,
    State,
    WriteBudget,
    WriteIntent,
    completed,
)

logger = logging.getLogger(__name__)

IMPORT_RATE_LIMIT_PAUSE = 60.0
SUMMARY_EVERY = 5.0  # seconds between two asks "anything outstanding?" while one is unknown
MAX_POLL_INTERVAL = 60.0


@dataclass
class ImportLifecycle:
    budget: ImportBudget
    timeout: float  # seconds AC may leave an import unconfirmed before it counts as unknown
    rng: random.Random
    new_id: Callable[[], str]
    # Seconds after which an import AC still reports processing (or outstanding) is given up:
    # its changes are sent again and its emails released, though it may still land.
    give_up: float = 3600.0
    expected_seconds: float = 2.0  # learned from completions (EWMA)
    imports: dict[str, Import] = field(default_factory=dict)
    next_summary_at: float = 0.0
    summary_asked_at: float | None = None
    _seq: Any = field(default_factory=itertools.count)

    # ---- queries ------------------------------------------------------------------------

    def outstanding(self) -> int:
        return len(self.imports)

    def contacts(self) -> int:
        return sum(len(i.all_emails()) for i in self.imports.values())

    def busy_emails(self) -> set[str]:
        return {e for i in self.imports.values() for e in i.all_emails()}

    def touches(self, partitions: set[int]) -> bool:
        return any(i.partitions & partitions for i in self.imports.values())

    def oldest_age(self, now: float) -> float:
        return max((now - i.started for i in self.imports.values()), default=0.0)

    # ---- a new import -------------------------------------------------------------------

    def prepare(
        self,
        groups: list[Group],
        entries: list[dict[str, Any]],
        stamp: dict[int, int],
        now: float,
        wall: float,
    ) -> tuple[Import, list[Action]]:
        """(The caller adds to ``acks_due`` the write-ahead records it writes itself.)"""
        """Charge the budget and write ahead: the intents and the budget history, per
        partition. The import leaves once every write is acknowledged (``acked``)."""
        charge, charged = self.budget.take(wall)
        by_partition: dict[int, list[str]] = {}
        for group in groups:
            by_partition.setdefault(group.partition, []).append(group.email)
        imp = Import(
            self.new_id(),
            groups,
            entries,
            stamp,
            {p: tuple(e) for p, e in by_partition.items()},
            now,
            charge=charge,
        )
        self.imports[imp.import_id] = imp
        actions: list[Action] = [
            WriteBudget(p, self.budget.history(p, wall)) for p in charged if self.shared
        ]
        for partition, emails in imp.emails.items():
            actions.append(
                WriteIntent(partition, Intent(imp.import_id, None, emails, wall), imp.import_id)
            )
            imp.acks_due += 1
        return imp, actions

    @property
    def shared(self) -> bool:
        return self.budget.owned is not None

    def acked(self, import_id: str) -> bool:
        """One write-ahead record of the import was acknowledged. True when it may leave."""
        imp = self.imports.get(import_id)
        if imp is None or imp.state is not State.PREPARING:
            return False
        imp.acks_due -= 1
        if imp.acks_due <= 0:
            imp.state = State.SUBMITTING
            return True
        return False

    def submitted(
        self, import_id: str, result: Submitted | BaseException, now: float, wall: float
    ) -> list[Action]:
        """The bulk_import request returned (or crashed)."""
        imp = self.imports.get(import_id)
        if imp is None or imp.adopted or imp.state is not State.SUBMITTING:
            return []  # handed over meanwhile (a restored intent of the same id is followed)
        actions: list[Action] = []
        requests = result.requests if isinstance(result, Submitted) else 1
        changed = set(self.budget.settle(imp.charge, wall))  # AC counted it by now
        for _ in range(requests - 1):  # resent after AC refused some contacts
            extra, charged = self.budget.take(wall)
            changed.update(self.budget.settle(extra, wall) + charged)
        if self.shared:
            actions += [WriteBudget(p, self.budget.history(p, wall)) for p in sorted(changed)]
        if not isinstance(result, Submitted):
            logger.error("import submission crashed; its outcome is unknown", exc_info=result)
            return actions + self._unknown(imp, now)
        rejected = [imp.groups[i] for i in result.rejected]
        if rejected:
            changes = [c for g in rejected for c in g.changes]
            actions.append(Requeue(changes, imp.stamp, force_single=True, not_queued=True))
        if result.error is not None and not result.sent:
            # Nothing of it was queued (AC refused every contact): no intent is needed.
            return actions + self._close(imp, release=True)
        if result.error is not None:
            error = result.error
            sent = [c for i in result.sent for c in imp.groups[i].changes]
            if isinstance(error, RateLimited) and error.status == 400:
                # AC's per-minute import limit: not queued. Back-pressure for imports only.
                self.budget.pause(wall + IMPORT_RATE_LIMIT_PAUSE)
                return [*actions, Requeue(sent, imp.stamp), *self._close(imp, release=True)]
            if isinstance(error, PermanentApiError):
                # Refused as a whole (not queued): each change's own error, per contact.
                return [
                    *actions,
                    Requeue(sent, imp.stamp, force_single=True),
                    *self._close(imp, release=True),
                ]
            if error.status is not None and error.status < 500 and error.status != 408:
                return [*actions, Fail(sent, error, imp.stamp), *self._close(imp, release=True)]
            # A timeout, a 5xx, a dropped connection: AC may have queued it.
            imp.groups = [imp.groups[i] for i in result.sent]
            return actions + self._unknown(imp, now)
        assert result.batch_id is not None
        imp.groups = [imp.groups[i] for i in result.sent]
        imp.batch_id = result.batch_id
        imp.state = State.QUEUED
        imp.queued_at = now
        imp.next_poll_at = now + next_poll_delay(0, self.expected_seconds)
        wall_at = wall
        for partition, emails in self._emails_by_partition(imp).items():
            actions.append(
                WriteIntent(
                    partition, Intent(imp.import_id, imp.batch_id, emails, wall_at), imp.import_id
                )
            )
        return actions

    def _emails_by_partition(self, imp: Import) -> dict[int, tuple[str, ...]]:
        by: dict[int, list[str]] = {}
        for group in imp.groups:
            by.setdefault(group.partition, []).append(group.email)
        return {p: tuple(e) for p, e in by.items()}

    def _unknown(self, imp: Import, now: float) -> list[Action]:
        imp.state = State.UNKNOWN
        self.next_summary_at = min(self.next_summary_at or now, now + 1.0)
        logger.warning(
            "an import's outcome is unknown: its emails wait until AC reports none outstanding",
            extra={"import": imp.import_id, "contacts": len(imp.all_emails())},
        )
        return []

    # ---- polling ------------------------------------------------------------------------

    def polls_due(self, now: float) -> list[Import]:
        return [
            i
            for i in self.imports.values()
            if i.state is State.QUEUED and i.batch_id is not None and now >= i.next_poll_at
        ]

    def poll_near(self, now: float, within: float) -> bool:
        """Is a poll in flight, or due within ``within`` seconds?"""
        horizon = now + within
        # In flight: ``next_poll_at`` is infinite until the answer is in.
        return any(
            i.state is State.QUEUED
            and i.batch_id is not None
            and (i.next_poll_at <= horizon or i.next_poll_at == float("inf"))
            for i in self.imports.values()
        )

    def polling(self, imp: Import, now: float) -> None:
        imp.next_poll_at = float("inf")  # until the answer is in

    def polled(
        self, import_id: str, status: ImportStatus | BaseException, now: float
    ) -> list[Action]:
        imp = self.imports.get(import_id)
        if imp is None or imp.state is not State.QUEUED:
            return []
        if isinstance(status, BaseException):
            if isinstance(status, PermanentApiError) and status.status == 404:
                # AC does not know the batch (any more): whether it landed is unknown.
                return self._unknown(imp, now)
            delay = backoff_delay(min(imp.polls, 8), self.rng.random(), cap=MAX_POLL_INTERVAL)
            if isinstance(status, RateLimited):
                delay = max(delay, status.retry_after)
            imp.polls += 1
            imp.next_poll_at = now + delay
            if now - imp.started > self.timeout:
                # AC cannot say for this long: unknown, settled by AC's summary.
                return self._unknown(imp, now)
            return []
        if not status.completed:
            imp.processing_at = now - imp.queued_at
            imp.polls += 1
            imp.next_poll_at = now + next_poll_delay(
                imp.polls, self.expected_seconds, MAX_POLL_INTERVAL
            )
            return self._maybe_give_up(imp, now)
        self.expected_seconds = learn_expected(
            self.expected_seconds, now - imp.queued_at, imp.processing_at if imp.polls else None
        )
        return completed(imp, status) + self._close(imp, release=True)

    def _maybe_give_up(self, imp: Import, now: float) -> list[Action]:
        """AC says the import is still processing: its emails wait (it may land any time),
        up to ``give_up``; then the stall is bounded at the cost of that certainty."""
        if now - imp.started <= self.give_up:
            return []
        logger.error(
            "import still processing at AC after IMPORT_GIVE_UP_SECONDS; its changes are sent "
            "again and its emails released (if it lands later, it may undo newer changes)",
            extra={"import": imp.import_id, "batch_id": imp.batch_id},
        )
        return self._resend(imp, abandoned=True)

    def _resend(self, imp: Import, *, abandoned: bool = False) -> list[Action]:
        changes = [c for g in imp.groups for c in g.changes]
        actions: list[Action] = (
            [Requeue(changes, imp.stamp, abandoned=abandoned)] if changes or abandoned else []
        )
        return actions + self._close(imp, release=True)

    def _close(self, imp: Import, *, release: bool) -> list[Action]:
        """The import's outcome is recorded: delete its intents (after the entries: same
        partitions, in order), release its emails."""
        del self.imports[imp.import_id]
        actions: list[Action] = [DeleteIntent(p, imp.import_id) for p in sorted(imp.emails)]
        if release:
            actions.append(Release(imp.all_emails()))
        return actions

    # ---- unknown outcomes --------------------------------------------------------------------

    def summary_due(self, now: float) -> bool:
        return (
            self.summary_asked_at is None
            and any(i.state is State.UNKNOWN for i in self.imports.values())
            and now >= self.next_summary_at
        )

    def asking_summary(self, now: float) -> None:
        self.summary_asked_at = now

    def summarized(self, outstanding: int | BaseException, now: float) -> list[Action]:
        """AC's count of imports still to process. Zero: every import sent before the question
        was asked has landed or never will: resend the unknown ones."""
        asked, self.summary_asked_at = self.summary_asked_at, None
        self.next_summary_at = now + SUMMARY_EVERY
        actions: list[Action] = []
        for imp in [i for i in self.imports.values() if i.state is State.UNKNOWN]:
            if (
                isinstance(outstanding, int)
                and outstanding == 0
                and asked is not None
                and imp.started <= asked
            ):
                actions += self._resend(imp)
            elif now - imp.started > self.give_up:
                logger.error(
                    "import outcome still unknown after IMPORT_GIVE_UP_SECONDS; its changes are "
                    "sent again and its emails released (if it lands later, it may undo newer "
                    "changes)",
                    extra={"import": imp.import_id},
                )
                actions += self._resend(imp, abandoned=True)
        return actions

    # ---- a previous owner's imports -----------------------------------------------------

    def adopt(
        self, partition: int, intents: list[Intent], stamp: Mapping[int, int], now: float
    ) -> None:
        """Intents found in a restored partition: the previous owner's imports that may still
        land. Their emails stay blocked until the outcome is known."""
        for intent in intents:
            imp = Import(
                intent.intent_id,
                [],
                [],
                dict(stamp),
                {partition: intent.emails},
                now,
                state=State.QUEUED if intent.batch_id else State.UNKNOWN,
                batch_id=intent.batch_id,
                next_poll_at=now,
                adopted=True,
            )
            existing = self.imports.get(intent.intent_id)
            if existing is not None:  # the same import touched several of our partitions
                existing.emails[partition] = intent.emails
                existing.stamp.update(stamp)
                continue
            self.imports[intent.intent_id] = imp
            if imp.state is State.UNKNOWN:
                self.next_summary_at = now

    # ---- rebalance ----------------------------------------------------------------------

    def forget(self, partitions: set[int]) -> list[Action]:
        """The partitions were handed over: their imports are the new owner's to follow
        (their intents stay in the ledger). Imports that also carry other partitions keep
        following those."""
        actions: list[Action] = []
        for imp in list(self.imports.values()):
            gone = imp.partitions & partitions
            if not gone:
                continue
            released = {e for p in gone for e in imp.emails[p]}
            for partition in gone:
                del imp.emails[partition]
            # ``groups`` stays as sent (a submission's answer refers to it by index); what it
            # holds of these partitions is no longer applied (``Ownership.owns`` says no).
            actions.append(Release(released))
            if not imp.emails:
                del self.imports[imp.import_id]
        return actions

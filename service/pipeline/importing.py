"""The bulk path's shell: fills imports, writes them ahead, sends them, polls them, and carries
out what the import lifecycle (``service/pipeline/imports.py``) decides.

- Groups that may go in an import wait in ``ready`` (their emails held) until there are at
  least ``BULK_MIN_CONTACTS`` (fewer after ``IMPORT_GATHER_SECONDS`` go per contact: AC says
  imports are not for tiny updates; ``IMPORT_GATHER_BUSY_SECONDS`` while imports are
  outstanding, since their completions bring more) and the import budget has room (meanwhile the batch grows).
- An import is filled to 250 contacts and under 400000 bytes (what does not fit waits for the
  next one), its lists checked when not confirmed for a while, then written ahead: each
  email's pending states, the partitions' intents and import history; it leaves once the
  broker acknowledged them all.
- Polls (``import/info``) and AC's summary (``GET /import/bulk_import``) follow imports until
  their outcome is known; polls never take the last worker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.core import acapi
from service.core.bulk import (
    MAX_CONTACTS,
    Submitted,
    contact_entry,
    encoded_size,
    pack,
    submit_import,
)
from service.core.coalesce import PendingChange
from service.core.contact import contact_fields
from service.core.ledger import Plan, fields_hash
from service.pipeline import import_actions as steps
from service.pipeline.desk import Desk, Ready
from service.pipeline.dispatch import ImportTask, PollTask, SummaryTask, VerifyTask
from service.pipeline.import_actions import Action, Group
from service.pipeline.imports import ImportLifecycle
from service.pipeline.learning import Learning
from service.pipeline.lists import Lists
from service.pipeline.verify import Verification

IMPORT_GATHER_SECONDS = 0.2  # the bulk path takes due changes once the first is this late
# While imports are outstanding, a few due contacts wait this long for more before going per
# contact: a backlog's imports release emails whose later changes were held back, a few at a
# time, and one contact per contact costs up to three requests where an import costs 1/250.
IMPORT_GATHER_BUSY_SECONDS = 5.0
# A partly filled import waits up to this long while more changes fall due within it: an import
# costs two requests (submit, poll) and one of AC's 100 a minute whatever it carries, so a
# backlog whose changes fall due over a few seconds leaves in full imports, not in a dozen
# partial ones (what binds a drain is exactly those requests and that minute).
IMPORT_FILL_SECONDS = 2.0
MAX_PREPARING = 2


@dataclass
class Importing:
    desk: Desk
    lifecycle: ImportLifecycle
    lists: Lists
    verification: Verification
    per_contact: Callable[[Ready], None]
    ready: deque[Ready] = field(default_factory=deque)
    preparing: dict[str, list[Ready]] = field(default_factory=dict)  # import id -> its groups
    learning: Learning = field(init=False)

    def __post_init__(self) -> None:
        self.learning = Learning(self.desk, self.lifecycle, self.verification, self._draining)

    def _draining(self) -> bool:
        """Imports are on their way: ready, being prepared, or outstanding at AC."""
        return bool(self.lifecycle.imports) or bool(self.ready) or bool(self.preparing)

    def pending(self) -> int:
        queued = sum(len(r.changes) for r in self.ready)
        sent = sum(len(g.changes) for i in self.lifecycle.imports.values() for g in i.groups)
        return queued + sent

    # ---- filling and sending ----------------------------------------------------------------

    def start(self, now: float, *, flush: bool) -> None:
        wall = self.desk.wall()
        while self.ready and self.desk.sending():
            while self.ready and not self.desk.owns(self.ready[0]):
                self.ready.popleft()
            if not self.ready:
                return
            if len(self.ready) < self.desk.settings.bulk_min:
                gather = (
                    IMPORT_GATHER_BUSY_SECONDS if self.lifecycle.imports else IMPORT_GATHER_SECONDS
                )
                # Counted from when the oldest group became ready: an exit is ready only after
                # its read, and still waits for others to share an import with. (Counting from
                # when it fell due sent the exit-heavy benchmark's exits one request each.)
                if flush or now - self.ready[0].since >= gather or not self.may_gather():
                    while self.ready:
                        self.per_contact(self.ready.popleft())
                return
            if len(self.preparing) >= MAX_PREPARING or not self.lifecycle.budget.available(wall):
                return  # the batch grows while we wait for an import slot
            if self._sending() >= max(1, self.desk.settings.concurrency // 2):
                # Half the workers are left to the polls that confirm imports: a minute's
                # burst of imports otherwise held every worker, and the polls (the commit with
                # them) waited for the burst to end.
                return
            if not flush and self._filling(now):
                return
            if self.lists.stale(self.ready, now):
                self.lists.reverify(self.ready, now)
                return
            self._prepare(now, wall)

    def _sending(self) -> int:
        """Imports on their way to AC: waiting for their write-ahead or in a worker."""
        return len(self.preparing) + sum(1 for _ in self.desk.dispatcher.tasks(ImportTask))

    def may_gather(self) -> bool:
        """Could an import's minimum still gather? Counts everything that may become ready:
        pending changes, the ready, exits being verified. With fewer, a gathering pause only
        delays changes that go per contact anyway (a trickle's every event)."""
        desk = self.desk
        coming = len(desk.coalescer) + len(self.ready) + self.verification.pending()
        if coming >= desk.settings.bulk_min:
            return True
        for task in desk.dispatcher.tasks(VerifyTask):
            assert isinstance(task, VerifyTask)
            coming += len(task.groups)
        return coming >= desk.settings.bulk_min

    def _filling(self, now: float) -> bool:
        """True while a partly filled import should wait for changes about to fall due."""
        if len(self.ready) >= MAX_CONTACTS:
            return False
        oldest = self.ready[0].since
        if now - oldest >= IMPORT_FILL_SECONDS:
            return False
        coming = self.desk.coalescer.next_due_at()
        return coming is not None and coming <= oldest + IMPORT_FILL_SECONDS

    def _prepare(self, now: float, wall: float) -> None:
        readies: list[Ready] = []
        entries: list[dict[str, Any]] = []
        while self.ready and len(readies) < MAX_CONTACTS:
            ready = self.ready.popleft()
            if not self.desk.owns(ready) or self.verification.stale(ready, now):
                continue
            readies.append(ready)
            entries.append(self._entry(ready))
        fits = pack([encoded_size(e) for e in entries])
        if len(fits) > 1:  # what does not fit under 400000 bytes waits for the next import
            count = len(fits[0])
            for ready in reversed(readies[count:]):
                self.ready.appendleft(ready)
            readies, entries = readies[:count], entries[:count]
        if not readies:
            return
        groups = [Group(r.email, r.partition, r.changes) for r in readies]
        stamp = {r.partition: r.generation for r in readies}
        imp, actions = self.lifecycle.prepare(groups, entries, stamp, now, wall)
        self.preparing[imp.import_id] = readies
        self.desk.metrics.imports.labels("prepared").inc()
        for ready in readies:
            if self.desk.confirm.write_pending(
                ready.changes,
                ready.generation,
                self.desk.list_ids(ready.changes),
                self._on_ack(imp.import_id),
                via_import=True,
            ):
                imp.acks_due += 1
        self.apply(actions, now)

    def _entry(self, ready: Ready) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for change in ready.changes:
            list_id = self.desk.directory.get(change.target)
            assert list_id is not None
            if change.plan is Plan.FIRST_ENTRY:
                statuses[list_id] = 1
            elif change.plan is Plan.UNSUBSCRIBE:
                statuses[list_id] = 2
        standard, custom = ready.plan.fields or ({}, {})
        return contact_entry(ready.email, statuses, standard, custom)

    def _on_ack(self, import_id: str) -> Callable[[], None]:
        return lambda: self.acked(import_id)

    def acked(self, import_id: str) -> None:
        """One write-ahead record is on the broker; the import leaves when all are."""
        if not self.lifecycle.acked(import_id):
            return
        imp = self.lifecycle.imports[import_id]
        readies = self.preparing.pop(import_id, [])
        self.desk.submit(
            ImportTask(import_id, imp.stamp, {r.email for r in readies}), submit_import(imp.entries)
        )
        self.desk.metrics.imports.labels("submitted").inc()

    def submitted(self, task: ImportTask, result: Any, now: float) -> None:
        if isinstance(result, Submitted):
            if result.batch_id is not None:
                self.desk.opened(task)
                self.desk.metrics.imports.labels("queued").inc()
                self.desk.metrics.import_contacts.inc(len(result.sent))
            elif result.error is not None:
                self.desk.metrics.imports.labels("failed").inc()
        self.apply(self.lifecycle.submitted(task.import_id, result, now, self.desk.wall()), now)

    # ---- following imports --------------------------------------------------------------------

    def start_polls(self, now: float) -> None:
        desk = self.desk
        for imp in self.lifecycle.polls_due(now):
            if desk.room(polling=True) <= 0:
                return
            assert imp.batch_id is not None
            self.lifecycle.polling(imp, now)
            task = PollTask(imp.import_id, frozenset(imp.partitions))
            desk.submit(task, acapi.import_info(imp.batch_id))
        if self.lifecycle.summary_due(now) and desk.room(polling=True) > 0:
            self.lifecycle.asking_summary(now)
            desk.submit(SummaryTask(), acapi.imports_outstanding())

    def polled(self, task: PollTask, result: Any, now: float) -> None:
        if not isinstance(result, BaseException):
            self.desk.opened(task)
            if result.completed:
                self.desk.metrics.imports.labels("completed").inc()
        self.apply(self.lifecycle.polled(task.import_id, result, now), now)

    def summarized(self, task: SummaryTask, result: Any, now: float) -> None:
        if not isinstance(result, BaseException):
            self.desk.opened(task)
        self.apply(self.lifecycle.summarized(result, now), now)

    # ---- the lifecycle's decisions -------------------------------------------------------------

    def apply(self, actions: list[Action], now: float) -> None:
        """Carry out what the import lifecycle decided, in order."""
        for action in actions:
            handler = _HANDLERS[type(action)]
            handler(self, action, now)

    def _write_intent(self, action: steps.WriteIntent, now: float) -> None:
        if action.partition in self.desk.ownership.assigned:
            self.desk.ledger.write_intent(
                action.partition, action.intent, self._on_ack(action.import_id)
            )
        else:
            self.acked(action.import_id)  # no ledger of ours to write to

    def _delete_intent(self, action: steps.DeleteIntent, now: float) -> None:
        if action.partition in self.desk.ownership.assigned:
            self.desk.ledger.delete_intent(action.partition, action.intent_id)

    def _write_budget(self, action: steps.WriteBudget, now: float) -> None:
        if action.partition in self.desk.ownership.assigned:
            self.desk.ledger.write_budget(action.partition, action.history)

    def _record(self, action: steps.Record, now: float) -> None:
        changes = action.group.changes
        self.desk.confirm.record(
            changes,
            action.known,
            action.stamp.get(action.group.partition, -1),
            list_ids=self.desk.list_ids(changes),
            fields_hash=self._fields_hash(changes),
        )

    def _requeue(self, action: steps.Requeue, now: float) -> None:
        if action.abandoned:
            self.desk.metrics.imports.labels("abandoned").inc()
        if action.not_queued:
            self._clear_pending(action.changes, action.stamp)
        self.desk.confirm.requeue(action.changes, action.stamp, now, single=action.force_single)

    def _fail(self, action: steps.Fail, now: float) -> None:
        self._clear_pending(action.changes, action.stamp)
        for change in action.changes:
            generation = action.stamp.get(change.partition, -1)
            self.desk.confirm.fail_all([change], action.error, generation, now)

    def _release(self, action: steps.Release, now: float) -> None:
        self.desk.release(action.emails)
        self.desk.adopted -= action.emails

    def _learn(self, action: steps.Learn, now: float) -> None:
        self.learning.add(action.ids, action.emails, now)

    def _landed(self, action: steps.Landed, now: float) -> None:
        for email in action.emails:
            if email not in action.failed:
                self.desk.confirm.landed(email, action.partition, action.generation)

    def _clear_pending(self, changes: list[PendingChange], stamp: Mapping[int, int]) -> None:
        by_email: dict[tuple[str, int], list[PendingChange]] = {}
        for change in changes:
            by_email.setdefault((change.email, change.partition), []).append(change)
        for (_, partition), group in by_email.items():
            self.desk.confirm.clear_pending(group, stamp.get(partition, -1))

    def _fields_hash(self, changes: list[PendingChange]) -> int | None:
        s = self.desk.settings
        return fields_hash(*contact_fields(changes, s.attribute_map, s.field_map)) or None

    def forget(self, partitions: set[int]) -> None:
        desk = self.desk
        for ready in [r for r in self.ready if r.partition in partitions]:
            self.ready.remove(ready)
            desk.release({ready.email})
        for import_id, readies in list(self.preparing.items()):
            if not any(r.partition in partitions for r in readies):
                continue
            # Not sent yet, and its intents name partitions we no longer own: take it back.
            self.preparing.pop(import_id)
            imp = self.lifecycle.imports.pop(import_id, None)
            for ready in readies:
                if ready.partition not in partitions:
                    stamp = {ready.partition: ready.generation}
                    desk.confirm.requeue(ready.changes, stamp, 0.0, single=False)
                desk.release({ready.email})
            for partition in imp.emails if imp is not None else ():
                if partition in desk.ownership.assigned and partition not in partitions:
                    desk.ledger.delete_intent(partition, import_id)
        self.apply(self.lifecycle.forget(partitions), 0.0)


_HANDLERS: dict[type, Callable[[Importing, Any, float], None]] = {
    steps.WriteIntent: Importing._write_intent,
    steps.DeleteIntent: Importing._delete_intent,
    steps.WriteBudget: Importing._write_budget,
    steps.Record: Importing._record,
    steps.Requeue: Importing._requeue,
    steps.Fail: Importing._fail,
    steps.Release: Importing._release,
    steps.Learn: Importing._learn,
    steps.Landed: Importing._landed,
}

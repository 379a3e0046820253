"""From due changes to AC work: take, decide, and hand each group to the stage that sends it.

Per loop turn (``step``), in this order:

1. polls and AC's summary for imports still out (``importing``);
2. lookups of lists seen in events (``lists``);
3. due changes are taken from the coalescer, one group per email (never an email already
   held); a group whose list id is not known waits for it (``lists``); the others are decided
   from the ledger (``plan_group``): settled now (nothing to send), uncertain (read AC first),
   exit (ask AC first, ``verify``), per contact, or bulk;
4. reads before decisions (``verify``), imports (``importing``), per-contact work (here:
   each one written ahead, then sent).

While AC refuses the account (the gate, ``confirm.Gate``) nothing is sent but one probe at a
time; changes are still taken and decided, and wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.core import acapi
from service.core.bulk import MAX_CONTACTS
from service.core.coalesce import ListRef, PendingChange
from service.core.contact import apply_contact
from service.core.errors import AccountBlocked, ApiError
from service.core.outcome import Outcome, OutcomeKind
from service.pipeline.desk import Desk, Held, OldestFirst, Ready
from service.pipeline.dispatch import (
    ApplyTask,
    ImportTask,
    LearnTask,
    ListTask,
    PollTask,
    ProbeTask,
    RecheckTask,
    SummaryTask,
    Task,
    VerifyTask,
)
from service.pipeline.importing import IMPORT_GATHER_SECONDS, Importing
from service.pipeline.imports import ImportLifecycle
from service.pipeline.lists import Lists
from service.pipeline.plan import Route, plan_group
from service.pipeline.verify import VERIFY_FRESH_SECONDS, Verification

logger = logging.getLogger(__name__)

PROBE = acapi.ApiCall("GET", "/lists", "lists", (("limit", "1"),))


@dataclass
class Delivery:
    desk: Desk
    lifecycle: ImportLifecycle
    single: OldestFirst = field(init=False)
    lists: Lists = field(init=False)
    verification: Verification = field(init=False)
    importing: Importing = field(init=False)

    def __post_init__(self) -> None:
        self.single = OldestFirst(self.desk.confirm.tracker.distance)
        self.lists = Lists(self.desk, self.route)
        self.verification = Verification(self.desk, self.route)
        self.importing = Importing(
            self.desk, self.lifecycle, self.lists, self.verification, self.single.append
        )

    # ---- queries ---------------------------------------------------------------------------

    def busy(self) -> Held:
        return Held(self.desk.held, self.desk.adopted)

    def pending(self) -> int:
        """Changes taken and not in a task (for back-pressure and gauges)."""
        return (
            self.lists.pending()
            + self.verification.pending()
            + self.importing.pending()
            + sum(len(r.changes) for r in self.single)
        )

    def idle(self) -> bool:
        desk = self.desk
        return not (
            desk.held or desk.adopted or desk.dispatcher.working() or self.lifecycle.imports
        )

    def want_list(self, ref: ListRef) -> None:
        self.lists.want(ref)

    # ---- the turn --------------------------------------------------------------------------

    def step(self, now: float, *, flush: bool = False) -> None:
        if not self.desk.sending():
            self._probe(now)
            self._take(now, flush=flush)  # decided and held meanwhile; sent once it opens
            return
        self.importing.start_polls(now)
        self.lists.start(now)
        self._take(now, flush=flush)
        self.verification.start(now, flush=flush)
        if self.desk.settings.bulk:
            self.importing.start(now, flush=flush)
        self._start_singles(now)
        if not flush:  # shutting down: learning would only keep the shutdown waiting
            self.importing.learning.start(now)

    def _take(self, now: float, *, flush: bool) -> None:
        queued = len(self.importing.ready) + len(self.single)
        limit = 2 * MAX_CONTACTS + self.desk.settings.concurrency - queued
        if limit <= 0:
            return
        coalescer = self.desk.coalescer
        if self.desk.settings.bulk and not flush:
            head = coalescer.next_due_at()
            if head is None:
                return
            if now < head + IMPORT_GATHER_SECONDS and self.importing.may_gather():
                # Changes fall due a few milliseconds apart (different partitions or batches):
                # wait a moment, so they leave in one import rather than two. Fewer pending
                # than an import's minimum go per contact whatever falls due: no pause then.
                return
        ownership = self.desk.ownership
        for group in coalescer.take_due(now, limit=limit, busy=self.busy(), flush_all=flush):
            partition = group[0].partition
            if not ownership.ready(partition):
                continue  # revoked meanwhile: dropped (the new owner reads them again)
            self.desk.held.add(group[0].email)
            # Ready since it fell due (this take already waited the gathering pause for it):
            # a lone change does not wait a second pause in the stage it goes to. Counted from
            # now for a group decided later (after a read: its pause gathers the others read).
            due = min(c.due_at for c in group)
            since = max(due, now - IMPORT_GATHER_SECONDS)
            self.route(ownership.generation(partition), group, now, since=since)

    def route(
        self, generation: int, group: list[PendingChange], now: float, since: float | None = None
    ) -> None:
        """Decide a held group and put it where it goes next (``since``: ready since, now when
        not given)."""
        missing = self.lists.missing(group)
        if missing is not None:
            self.lists.wait(missing, generation, group)
            return
        desk = self.desk
        email, partition = group[0].email, group[0].partition
        list_ids = desk.list_ids(group)
        s = desk.settings
        plan = plan_group(
            group,
            desk.ledger.get(partition, email),
            list_ids,
            s.attribute_map,
            s.field_map,
            verified_after=now - VERIFY_FRESH_SECONDS,
            stale_tolerance_ms=s.stale_tolerance_ms,
        )
        if plan.route is Route.SETTLED:
            desk.confirm.record(group, {}, generation, list_ids=list_ids)
            desk.release({email})
            return
        ready = Ready(generation, group, plan, now if since is None else since)
        if plan.route is Route.RECHECK:
            self.verification.recheck(ready)
        elif plan.route is Route.VERIFY:
            self.verification.exit(ready)
        elif plan.route is Route.BULK and s.bulk:
            self.importing.ready.append(ready)
        else:
            self.single.append(ready)

    # ---- per contact ------------------------------------------------------------------------

    def _start_singles(self, now: float) -> None:
        desk = self.desk
        while self.single and desk.room() > 0:
            ready = self.single.popleft()
            if not desk.owns(ready) or self.verification.stale(ready, now):
                continue
            list_ids = desk.list_ids(ready.changes)
            if desk.confirm.write_pending(
                ready.changes, ready.generation, list_ids, self._written_ahead(ready)
            ):
                desk.announcing.append(ready)
            else:
                self._send(ready)

    def _written_ahead(self, ready: Ready) -> Callable[[], None]:
        def written() -> None:
            if ready not in self.desk.announcing:
                return  # its partition was handed over meanwhile (released then)
            self.desk.announcing.remove(ready)
            if self.desk.owns(ready):
                self._send(ready)

        return written

    def _send(self, ready: Ready) -> None:
        desk = self.desk
        contact_id = next((c.contact_id for c in ready.changes if c.contact_id), None)
        contact_id = contact_id or desk.contact_id(ready.email, ready.partition)
        fields_hash = ready.plan.fields_hash if ready.plan.fields else 0
        task = ApplyTask(ready.email, ready.partition, ready.generation, ready.changes, fields_hash)
        call = apply_contact(
            ready.email, ready.changes, desk.list_ids(ready.changes), contact_id, ready.plan.fields
        )
        desk.submit(task, call)

    def applied(self, task: ApplyTask, result: Any, now: float) -> None:
        if isinstance(result, BaseException):
            logger.error("per-contact work crashed; retrying", exc_info=result)
            error = ApiError(None, "crash")
            outcomes = [Outcome(c, OutcomeKind.RETRY, error=error) for c in task.changes]
        else:
            outcomes = result
        self.desk.opened(task)
        for outcome in outcomes:
            if outcome.list_gone:
                self.lists.gone(outcome.list_gone)
        self.desk.confirm.settle(
            outcomes,
            task.generation,
            now,
            fields_hash=task.fields_hash or None,
            list_ids=self.desk.list_ids(task.changes),
        )
        self.desk.release({task.email})

    # ---- the gate -------------------------------------------------------------------------------

    def _probe(self, now: float) -> None:
        """The account is refused: one cheap request at a time tells when it is fixed."""
        gate = self.desk.confirm.gate
        if gate.may_probe(now) and not any(self.desk.dispatcher.tasks(ProbeTask)):
            gate.probed(now)
            self.desk.submit(ProbeTask(), acapi.request(PROBE))

    def probed(self, result: Any) -> None:
        if isinstance(result, dict) or (
            isinstance(result, ApiError) and not isinstance(result, AccountBlocked)
        ):
            self.desk.confirm.opened()  # an answer that is not a refusal: the account works

    # ---- completions and rebalances ------------------------------------------------------------

    def completed(self, task: Task, result: Any, now: float) -> None:
        if isinstance(task, ApplyTask):
            self.applied(task, result, now)
        elif isinstance(task, ImportTask):
            self.importing.submitted(task, result, now)
        elif isinstance(task, PollTask):
            self.importing.polled(task, result, now)
        elif isinstance(task, SummaryTask):
            self.importing.summarized(task, result, now)
        elif isinstance(task, VerifyTask):
            self.verification.verified(task, result, now)
        elif isinstance(task, RecheckTask):
            self.verification.rechecked(task, result, now)
        elif isinstance(task, ListTask):
            self.lists.answered(task, result, now)
        elif isinstance(task, ProbeTask):
            self.probed(result)
        elif isinstance(task, LearnTask):
            self.importing.learning.learned(task, result)

    def forget(self, partitions: set[int]) -> None:
        """The partitions were handed over: drop what waits for them, release their emails."""
        self.lists.forget(partitions)
        self.verification.forget(partitions)
        for queue in (self.single, self.desk.announcing):
            for ready in [r for r in queue if r.partition in partitions]:
                queue.remove(ready)
                self.desk.release({ready.email})
        self.importing.forget(partitions)

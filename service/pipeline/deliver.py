"""From due changes to AC work: take, find the lists, decide, verify exits, and start tasks.

Per loop turn (``step``), in this order:

1. take due changes from the coalescer, one group per email (never an email already held);
2. a group whose list id is not known waits for it; one ``ListTask`` per list finds or creates
   it (never two for one list: no duplicate lists);
3. ``plan_group`` decides each change from the ledger: settled now, verify (exits), single
   (per contact) or bulk (an import);
4. exits are verified per list in batches (``VerifyTask``): still subscribed -> unsubscribe
   (bulk or single); not subscribed -> recorded, nothing sent;
5. imports are prepared (write-ahead intents, ``service/pipeline/imports.py``) and submitted
   once acknowledged; polls and AC's summary follow them;
6. the rest goes per contact (``ApplyTask``).

Workers: polls never take the last worker (a backlog must not stall behind confirmations);
while the account gate is closed only one probe runs at a time. An email is *held* from the
moment it is taken until its work is recorded, parked or put back; the coalescer keeps its
newer changes aside meanwhile.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.adapters.ledger_store import LedgerStore
from service.core import acapi
from service.core.bulk import (
    MAX_CONTACTS,
    Submitted,
    Verified,
    contact_entry,
    encoded_size,
    pack,
    submit_import,
    verify_exits,
)
from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.contact import apply_contact
from service.core.errors import ApiError, PermanentApiError
from service.core.ledger import Known, Plan, SetBy, rechecked
from service.core.lists import ListDirectory, resolve_list
from service.core.outcome import Outcome, OutcomeKind
from service.metrics import Metrics
from service.pipeline import imports as lifecycle_mod
from service.pipeline.confirm import Confirmer
from service.pipeline.dispatch import (
    ApplyTask,
    Dispatcher,
    ImportTask,
    ListTask,
    PollTask,
    ProbeTask,
    RecheckTask,
    SummaryTask,
    Task,
    VerifyTask,
)
from service.pipeline.imports import Group, ImportLifecycle
from service.pipeline.ownership import Ownership
from service.pipeline.plan import GroupPlan, Route, plan_group

logger = logging.getLogger(__name__)

IMPORT_GATHER_SECONDS = 0.2  # the bulk path takes due changes once the first is this late
VERIFY_GATHER_SECONDS = 0.2
VERIFY_READS_PER_TASK = 4
VERIFY_FRESH_SECONDS = 10.0  # an exit's "still subscribed" is trusted this long
LIST_RETRY_SECONDS = 5.0
NOT_SUBSCRIBED = Known(2, SetBy.UNKNOWN, True)  # an exit found nothing of ours to undo


@dataclass
class _Ready:
    generation: int
    changes: list[PendingChange]
    plan: GroupPlan
    since: float

    @property
    def email(self) -> str:
        return self.changes[0].email

    @property
    def partition(self) -> int:
        return self.changes[0].partition


class _Held:
    """``email in held``: taken emails, and emails an adopted import still blocks."""

    def __init__(self, *sets: set[str]) -> None:
        self.sets = sets

    def __contains__(self, email: object) -> bool:
        return any(email in s for s in self.sets)


@dataclass
class DeliverySettings:
    concurrency: int
    bulk: bool
    bulk_min: int
    create_lists: bool
    sender_url: str
    sender_reminder: str
    attribute_map: Mapping[str, str]
    field_map: Mapping[str, str]


@dataclass
class Delivery:
    settings: DeliverySettings
    coalescer: Coalescer
    ledger: LedgerStore
    directory: ListDirectory
    lifecycle: ImportLifecycle
    dispatcher: Dispatcher
    confirm: Confirmer
    ownership: Ownership
    metrics: Metrics
    wall: Callable[[], float]
    clock_now: Callable[[], float]
    held: set[str] = field(default_factory=set)
    waiting_lists: dict[ListRef, list[tuple[int, list[PendingChange]]]] = field(
        default_factory=dict
    )
    resolving: set[ListRef] = field(default_factory=set)
    list_retry_at: dict[ListRef, float] = field(default_factory=dict)
    to_verify: dict[ListRef, deque[_Ready]] = field(default_factory=dict)
    ready_single: deque[_Ready] = field(default_factory=deque)
    to_recheck: deque[_Ready] = field(default_factory=deque)
    ready_bulk: deque[_Ready] = field(default_factory=deque)
    adopted: set[str] = field(default_factory=set)  # emails adopted imports still block
    preparing: dict[str, list[_Ready]] = field(default_factory=dict)  # import id -> its groups
    writing_ahead: int = 0  # per-contact tasks waiting for their write-ahead's ack
    lists_wanted: set[ListRef] = field(default_factory=set)

    # ---- queries ---------------------------------------------------------------------------

    def busy(self) -> _Held:
        return _Held(self.held, self.adopted)

    def pending(self) -> int:
        """Changes taken and not yet in a task (for back-pressure and gauges)."""
        waiting = sum(len(c) for groups in self.waiting_lists.values() for _, c in groups)
        verify = sum(len(r.changes) for q in self.to_verify.values() for r in q)
        ready = sum(
            len(r.changes) for q in (self.ready_single, self.ready_bulk, self.to_recheck) for r in q
        )
        imports = sum(len(g.changes) for i in self.lifecycle.imports.values() for g in i.groups)
        return waiting + verify + ready + imports

    def idle(self) -> bool:
        return not (self.held or self.adopted or self.dispatcher.inflight or self.lifecycle.imports)

    # ---- the turn --------------------------------------------------------------------------

    def step(self, now: float, *, flush: bool = False) -> None:
        if self.confirm.gate.closed:
            self._probe(now)
            self._take(now, flush=flush)  # decided and held meanwhile; sent once it opens
            return
        self._start_polls(now)
        self._start_lists(now)
        self._take(now, flush=flush)
        self._start_rechecks(now)
        self._start_verifies(now, flush=flush)
        self._start_imports(now, flush=flush)
        self._start_singles(now)

    def _room(self, *, polling: bool = False) -> int:
        free = self.dispatcher.free - self.writing_ahead
        if polling:
            # Polls never hold every worker: one is left for new work.
            return max(0, min(free, self.settings.concurrency - 1 - self.dispatcher.polling))
        return free

    def _submit(self, task: Task, call: acapi.Call[Any], now: float) -> None:
        self.dispatcher.submit(task, call)

    def _gate_allows(self, now: float) -> bool:
        return not self.confirm.gate.closed

    def _probe(self, now: float) -> None:
        """The account is refused: one cheap request at a time tells when it is fixed."""
        gate = self.confirm.gate
        if gate.may_probe(now) and not any(self.dispatcher.tasks(ProbeTask)):
            gate.probed(now)
            call = acapi.request(acapi.ApiCall("GET", "/lists", "lists", (("limit", "1"),)))
            self.dispatcher.submit(ProbeTask(), call)

    def probed(self, task: ProbeTask, result: Any, now: float) -> None:
        if isinstance(result, dict):
            self.confirm.opened()
        elif isinstance(result, BaseException) and not _blocked(
            result if isinstance(result, ApiError) else ApiError(None, "")
        ):
            if isinstance(result, ApiError):
                self.confirm.opened()  # an answer that is not a refusal: the account works

    # ---- 1. take ---------------------------------------------------------------------------

    def _take(self, now: float, *, flush: bool) -> None:
        queued = len(self.ready_bulk) + len(self.ready_single)
        limit = 2 * MAX_CONTACTS + self.settings.concurrency - queued
        if limit <= 0:
            return
        if self.settings.bulk and not flush:
            head = self.coalescer.next_due_at()
            if head is None or now < head + IMPORT_GATHER_SECONDS:
                # Changes fall due a few milliseconds apart (different partitions or batches):
                # wait a moment, so they leave in one import rather than two.
                return
        for group in self.coalescer.take_due(now, limit=limit, busy=self.busy(), flush_all=flush):
            email, partition = group[0].email, group[0].partition
            if not self.ownership.ready(partition):
                continue  # revoked meanwhile: dropped (the new owner reads them again)
            self.held.add(email)
            self._route(self.ownership.generation(partition), group, now)

    def _route(self, generation: int, group: list[PendingChange], now: float) -> None:
        """Decide a held group and put it where it goes next."""
        for change in group:
            if self.directory.get(change.target) is None:
                self.waiting_lists.setdefault(change.target, []).append((generation, group))
                self.lists_wanted.add(change.target)
                return
        email, partition = group[0].email, group[0].partition
        entry = self.ledger.get(partition, email)
        list_ids = self._list_ids(group)
        plan = plan_group(
            group,
            entry,
            list_ids,
            self.settings.attribute_map,
            self.settings.field_map,
            verified_after=now - VERIFY_FRESH_SECONDS,
        )
        if plan.route is Route.SETTLED:
            self.confirm.record(group, {}, generation, list_ids=list_ids)
            self._release({email})
            return
        ready = _Ready(generation, group, plan, now)
        if plan.route is Route.RECHECK:
            self.to_recheck.append(ready)
        elif plan.route is Route.VERIFY:
            target = next(c.target for c in group if c.plan is Plan.EXIT)
            self.to_verify.setdefault(target, deque()).append(ready)
        elif plan.route is Route.BULK and self.settings.bulk:
            self.ready_bulk.append(ready)
        else:
            self.ready_single.append(ready)

    def _list_ids(self, changes: list[PendingChange]) -> dict[ListRef, str]:
        ids: dict[ListRef, str] = {}
        for change in changes:
            found = self.directory.get(change.target)
            if found is not None:
                ids[change.target] = found
        return ids

    def _release(self, emails: set[str]) -> None:
        for email in emails:
            self.held.discard(email)
            self.coalescer.release(email)

    # ---- 2. lists --------------------------------------------------------------------------

    def _start_lists(self, now: float) -> None:
        wanted = sorted(
            (
                ref
                for ref in self.lists_wanted
                if ref not in self.resolving
                and not self.directory.known(ref)
                and now >= self.list_retry_at.get(ref, 0.0)
            ),
            key=lambda r: (r.name or "", r.list_id or ""),
        )
        for ref in wanted:
            if self._room() <= 0 or not self._gate_allows(now):
                return
            if self.directory.full():
                self._park_list(ref, PermanentApiError(None, "list_limit", "too many lists"))
                continue
            self.resolving.add(ref)
            s = self.settings
            call = resolve_list(
                ref,
                create=s.create_lists,
                sender_url=s.sender_url,
                sender_reminder=s.sender_reminder,
            )
            self._submit(ListTask(ref), call, now)

    def list_resolved(self, task: ListTask, result: Any, now: float) -> None:
        ref = task.ref
        self.resolving.discard(ref)
        if isinstance(result, str):
            self.directory.learn(ref, result, now)
            self.lists_wanted.discard(ref)
            for generation, group in self.waiting_lists.pop(ref, []):
                if self.ownership.owns(group[0].partition, generation):
                    self._route(generation, group, now)
                else:
                    self._release({group[0].email})
            return
        if isinstance(result, PermanentApiError):
            self.lists_wanted.discard(ref)
            self._park_list(ref, result)
            return
        error = result if isinstance(result, ApiError) else ApiError(None, "crash")
        if not isinstance(result, ApiError):
            logger.error("list lookup crashed", exc_info=result)
        for generation, group in self.waiting_lists.get(ref, []):
            for change in group:
                if change.target == ref:
                    self.confirm.failed(
                        Outcome(
                            change,
                            OutcomeKind.BLOCKED if _blocked(error) else OutcomeKind.RETRY,
                            error=error,
                        ),
                        generation,
                        now,
                    )
        self.list_retry_at[ref] = now + LIST_RETRY_SECONDS
        self._requeue_waiting(ref, now)

    def _requeue_waiting(self, ref: ListRef, now: float) -> None:
        """Put back the other changes of groups that waited for ``ref`` (its own changes were
        settled by the caller)."""
        for generation, group in self.waiting_lists.pop(ref, []):
            rest = [c for c in group if c.target != ref]
            self.confirm.requeue(rest, {group[0].partition: generation}, now, single=False)
            self._release({group[0].email})

    def _park_list(self, ref: ListRef, error: PermanentApiError) -> None:
        """The list cannot be found or created: only that list's changes are parked."""
        for generation, group in self.waiting_lists.get(ref, []):
            for change in group:
                if change.target == ref:
                    self.confirm.park(change, error, generation)
        self._requeue_waiting(ref, 0.0)

    def list_gone(self, list_id: str, now: float) -> None:
        """AC says the list id does not exist: resolve (or create) it again."""
        for ref in self.directory.forget_id(list_id):
            logger.warning(
                "a list was deleted in AC; resolving it again", extra={"list": ref.label()}
            )

    # ---- 3b. uncertain states -----------------------------------------------------------------

    def _start_rechecks(self, now: float) -> None:
        """A write of ours was never confirmed (a crash came between): read what AC holds,
        before anything is decided (and before any new write is announced)."""
        while self.to_recheck and self._room() > 0:
            ready = self.to_recheck.popleft()
            if not self.ownership.owns(ready.partition, ready.generation):
                self._release({ready.email})
                continue
            task = RecheckTask(ready.email, ready.partition, ready.generation, ready.changes)
            self._submit(task, acapi.memberships(ready.email, self._contact_id(ready)), now)

    def rechecked(self, task: RecheckTask, result: Any, now: float) -> None:
        if isinstance(result, BaseException):
            error = result if isinstance(result, ApiError) else ApiError(None, "crash")
            if not isinstance(result, ApiError):
                logger.error("recheck crashed", exc_info=result)
            kind = OutcomeKind.BLOCKED if _blocked(error) else OutcomeKind.RETRY
            for change in task.changes:
                self.confirm.failed(Outcome(change, kind, error=error), task.generation, now)
            self._release({task.email})
            return
        self._opened(task)
        contact_id, lists = result
        known: dict[str, Known | None] = {}
        for change in task.changes:
            state = change.previous
            if state is None or not state.pending:
                continue
            list_id = self.directory.get(change.target)
            membership = lists.get(list_id) if list_id is not None else None
            known[state.list] = rechecked(
                state,
                membership.status if membership else None,
                membership.unsubscribed_at if membership else None,
            )
        self.confirm.resolve(task.email, task.partition, task.generation, known, contact_id)
        if self.ownership.owns(task.partition, task.generation):
            self._route(task.generation, task.changes, now)
        else:
            self._release({task.email})

    # ---- 4. verify exits -------------------------------------------------------------------

    def _start_verifies(self, now: float, *, flush: bool) -> None:
        for ref in list(self.to_verify):
            queue = self.to_verify[ref]
            while queue and self._room() > 0 and self._gate_allows(now):
                if not flush and len(queue) < 100 and now - queue[0].since < VERIFY_GATHER_SECONDS:
                    break
                batch: list[_Ready] = []
                reads = known = 0
                while queue and reads < VERIFY_READS_PER_TASK:
                    ready = queue.popleft()
                    if not self.ownership.owns(ready.partition, ready.generation):
                        self._release({ready.email})
                        continue
                    if self._contact_id(ready) is None:
                        reads += 1
                    else:
                        known += 1
                        if known % 100 == 1:
                            reads += 1
                    batch.append(ready)
                if not queue:
                    del self.to_verify[ref]
                if not batch:
                    break
                list_id = self.directory.get(ref)
                assert list_id is not None
                emails = {r.email: self._contact_id(r) for r in batch}
                task = VerifyTask(
                    ref,
                    list_id,
                    [(r.generation, r.changes) for r in batch],
                    {r.email: r.plan.fields for r in batch},
                    {r.email: r.plan.fields_hash for r in batch},
                )
                self._submit(task, verify_exits(list_id, emails), now)
                if ref not in self.to_verify:
                    break

    def _stale_verification(self, ready: _Ready, now: float) -> bool:
        """An unsubscribe waited too long since AC said "still subscribed" (an import slot, a
        retry): the person may have opted out meanwhile. Ask again rather than unsubscribe on
        an old answer (the window a person's own opt-out could be taken for ours stays short)."""
        stale = [
            c
            for c in ready.changes
            if c.plan is Plan.UNSUBSCRIBE and now - c.verified_at > VERIFY_FRESH_SECONDS
        ]
        if not stale:
            return False
        for change in stale:
            change.plan = Plan.EXIT
        target = stale[0].target
        self.to_verify.setdefault(target, deque()).append(
            _Ready(ready.generation, ready.changes, ready.plan, now)
        )
        return True

    def _contact_id(self, ready: _Ready) -> str | None:
        if ready.email in self.confirm.forgotten_contacts:
            return None
        entry = self.ledger.get(ready.partition, ready.email)
        return entry.contact_id if entry else None

    def verified(self, task: VerifyTask, result: Any, now: float) -> None:
        if not isinstance(result, Verified):
            error = result if isinstance(result, ApiError) else ApiError(None, "crash")
            if not isinstance(result, ApiError):
                logger.error("exit verification crashed", exc_info=result)
            for generation, changes in task.groups:
                for change in changes:
                    kind = OutcomeKind.BLOCKED if _blocked(error) else OutcomeKind.RETRY
                    if isinstance(error, PermanentApiError):
                        kind = OutcomeKind.RETRY  # a read refused: try again later, not park
                    self.confirm.failed(Outcome(change, kind, error=error), generation, now)
                self._release({changes[0].email})
            return
        self._opened(task)
        for generation, changes in task.groups:
            email = changes[0].email
            if not self.ownership.owns(changes[0].partition, generation):
                self._release({email})
                continue
            contact_id = result.subscribed.get(email)
            done: list[PendingChange] = []
            for change in changes:
                if change.plan is Plan.EXIT and change.target == task.ref:
                    if contact_id is not None:
                        change.plan = Plan.UNSUBSCRIBE
                        change.contact_id = contact_id
                        change.verified_at = now
                    else:
                        done.append(change)
            if done:
                self.confirm.record(
                    done,
                    {i: NOT_SUBSCRIBED for i in range(len(done))},
                    generation,
                    list_ids=self._list_ids(done),
                )
            rest = [c for c in changes if c not in done]
            if rest:
                self._route(generation, rest, now)
            else:
                self._release({email})

    # ---- 5. imports ------------------------------------------------------------------------

    def _start_imports(self, now: float, *, flush: bool) -> None:
        if not self.settings.bulk:
            return
        wall = self.wall()
        while self.ready_bulk and not self.confirm.gate.closed:
            # Drop what is no longer ours.
            while self.ready_bulk and not self.ownership.owns(
                self.ready_bulk[0].partition, self.ready_bulk[0].generation
            ):
                self._release({self.ready_bulk.popleft().email})
            if not self.ready_bulk:
                return
            enough = len(self.ready_bulk) >= self.settings.bulk_min
            waited = now - self.ready_bulk[0].since >= IMPORT_GATHER_SECONDS
            if not enough:
                if waited or flush:
                    # Too few for an import (AC: not meant for tiny updates): per contact.
                    while self.ready_bulk:
                        self.ready_single.append(self.ready_bulk.popleft())
                return
            if len(self.preparing) >= 2 or not self.lifecycle.budget.available(wall):
                return  # the batch grows while we wait for an import slot
            if any(self.directory.stale(c.target, now) for r in self.ready_bulk for c in r.changes):
                self._reverify_lists(now)
                return
            self._prepare_import(now, wall)

    def _reverify_lists(self, now: float) -> None:
        """An import skips a list id AC no longer has (and says nothing): before one uses a
        list not confirmed for a while, check it exists (``ListTask`` resolves it again)."""
        for ready in self.ready_bulk:
            for change in ready.changes:
                if self.directory.stale(change.target, now) and change.target not in self.resolving:
                    list_id = self.directory.get(change.target)
                    if list_id is None or self._room() <= 0:
                        continue
                    self.resolving.add(change.target)
                    self._submit(
                        ListTask(change.target), _confirm_list(change.target, list_id), now
                    )

    def list_checked(self, task: ListTask, result: Any, now: float) -> None:
        """The answer to ``_reverify_lists``: the id still exists (or a new one was found)."""
        ref = task.ref
        self.resolving.discard(ref)
        if isinstance(result, str):
            old = self.directory.get(ref)
            if old is not None and old != result:
                self.list_gone(old, now)
            self.directory.learn(ref, result, now)
        elif isinstance(result, PermanentApiError):
            old = self.directory.get(ref)
            if old is not None:
                self.list_gone(old, now)
            self._unready_list(ref, now)
        else:
            self.list_retry_at[ref] = now + LIST_RETRY_SECONDS
            self.directory.confirm(ref, now)  # try again in a while; the import may go

    def _unready_list(self, ref: ListRef, now: float) -> None:
        """Groups ready for an import whose list is gone: decide them again once it is found."""
        keep: deque[_Ready] = deque()
        for ready in self.ready_bulk:
            if any(c.target == ref for c in ready.changes):
                self.waiting_lists.setdefault(ref, []).append((ready.generation, ready.changes))
                self.lists_wanted.add(ref)
            else:
                keep.append(ready)
        self.ready_bulk = keep

    def _prepare_import(self, now: float, wall: float) -> None:
        readies: list[_Ready] = []
        entries: list[dict[str, Any]] = []
        while self.ready_bulk and len(readies) < MAX_CONTACTS:
            ready = self.ready_bulk.popleft()
            if not self.ownership.owns(ready.partition, ready.generation):
                self._release({ready.email})
                continue
            if self._stale_verification(ready, now):
                continue
            readies.append(ready)
            entries.append(self._entry(ready))
        fits = pack([encoded_size(e) for e in entries])
        if len(fits) > 1:  # what does not fit under 400000 bytes waits for the next import
            count = len(fits[0])
            for ready in reversed(readies[count:]):
                self.ready_bulk.appendleft(ready)
            readies, entries = readies[:count], entries[:count]
        if not readies:
            return
        groups = [Group(r.email, r.partition, r.changes) for r in readies]
        stamp = {r.partition: r.generation for r in readies}
        imp, actions = self.lifecycle.prepare(groups, entries, stamp, now, wall)
        self.preparing[imp.import_id] = readies
        self.metrics.imports.labels("prepared").inc()
        for ready in readies:
            if self.confirm.write_pending(
                ready.changes,
                ready.generation,
                self._list_ids(ready.changes),
                self._on_intent(imp.import_id, now),
                via_import=True,
            ):
                imp.acks_due += 1
        self.apply(actions, now)

    def _entry(self, ready: _Ready) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        for change in ready.changes:
            list_id = self.directory.get(change.target)
            assert list_id is not None
            if change.plan is Plan.FIRST_ENTRY:
                statuses[list_id] = 1
            elif change.plan is Plan.UNSUBSCRIBE:
                statuses[list_id] = 2
        standard, custom = ready.plan.fields or ({}, {})
        return contact_entry(ready.email, statuses, standard, custom)

    def _on_intent(self, import_id: str, now: float) -> Callable[[], None]:
        return lambda: self.intent_acked(import_id, now)

    def intent_acked(self, import_id: str, now: float) -> None:
        """One write-ahead record is on the broker; the import leaves when all are."""
        if not self.lifecycle.acked(import_id):
            return
        imp = self.lifecycle.imports[import_id]
        readies = self.preparing.pop(import_id, [])
        task = ImportTask(import_id, imp.stamp, {r.email for r in readies})
        self._submit(task, submit_import(imp.entries), now)
        self.metrics.imports.labels("submitted").inc()

    def apply(self, actions: list[lifecycle_mod.Action], now: float) -> None:
        """Carry out what the import lifecycle decided."""
        for action in actions:
            if isinstance(action, lifecycle_mod.WriteIntent):
                if action.partition not in self.ownership.assigned:
                    self.intent_acked(action.import_id, now)  # no ledger of ours to write to
                    continue
                self.ledger.write_intent(
                    action.partition, action.intent, self._on_intent(action.import_id, now)
                )
            elif isinstance(action, lifecycle_mod.DeleteIntent):
                if action.partition in self.ownership.assigned:
                    self.ledger.delete_intent(action.partition, action.intent_id)
            elif isinstance(action, lifecycle_mod.WriteBudget):
                if action.partition in self.ownership.assigned:
                    self.ledger.write_budget(action.partition, action.history)
            elif isinstance(action, lifecycle_mod.Record):
                group = action.group
                generation = action.stamp.get(group.partition, -1)
                list_ids = self._list_ids(group.changes)
                self.confirm.record(
                    group.changes,
                    action.known,
                    generation,
                    list_ids=list_ids,
                    fields_hash=self._import_hash(group),
                )
            elif isinstance(action, lifecycle_mod.Requeue):
                if action.not_queued:
                    self._clear_pending(action.changes, action.stamp)
                self.confirm.requeue(action.changes, action.stamp, now, single=action.force_single)
            elif isinstance(action, lifecycle_mod.Fail):
                self._clear_pending(action.changes, action.stamp)
                for change in action.changes:
                    generation = action.stamp.get(change.partition, -1)
                    self.confirm.fail_all([change], action.error, generation, now)
            elif isinstance(action, lifecycle_mod.Release):
                self._release(action.emails)
                self.adopted -= action.emails

    def _clear_pending(self, changes: list[PendingChange], stamp: Mapping[int, int]) -> None:
        by_email: dict[tuple[str, int], list[PendingChange]] = {}
        for change in changes:
            by_email.setdefault((change.email, change.partition), []).append(change)
        for (_, partition), group in by_email.items():
            self.confirm.clear_pending(group, stamp.get(partition, -1))

    def _import_hash(self, group: Group) -> int | None:
        from service.core.contact import contact_fields
        from service.core.ledger import fields_hash

        standard, custom = contact_fields(
            group.changes, self.settings.attribute_map, self.settings.field_map
        )
        value = fields_hash(standard, custom)
        return value or None

    def import_submitted(self, task: ImportTask, result: Any, now: float) -> None:
        if isinstance(result, Submitted):
            if result.batch_id is not None:
                self._opened(task)
                self.metrics.imports.labels("queued").inc()
                imp = self.lifecycle.imports.get(task.import_id)
                if imp is not None:
                    self.metrics.import_contacts.inc(len(result.sent))
            elif result.error is not None:
                self.metrics.imports.labels("failed").inc()
        self.apply(self.lifecycle.submitted(task.import_id, result, now, self.wall()), now)

    # ---- polls and the summary ---------------------------------------------------------------

    def _start_polls(self, now: float) -> None:
        for imp in self.lifecycle.polls_due(now):
            if self._room(polling=True) <= 0 or not self._gate_allows(now):
                return
            assert imp.batch_id is not None
            self.lifecycle.polling(imp, now)
            self._submit(
                PollTask(imp.import_id, frozenset(imp.partitions)),
                acapi.import_info(imp.batch_id),
                now,
            )
        if (
            self.lifecycle.summary_due(now)
            and self._room(polling=True) > 0
            and self._gate_allows(now)
        ):
            self.lifecycle.asking_summary(now)
            self._submit(SummaryTask(), acapi.imports_outstanding(), now)

    def polled(self, task: PollTask, result: Any, now: float) -> None:
        if not isinstance(result, BaseException):
            self._opened(task)
            if result.completed:
                self.metrics.imports.labels("completed").inc()
        self.apply(self.lifecycle.polled(task.import_id, result, now), now)

    def summarized(self, task: SummaryTask, result: Any, now: float) -> None:
        if not isinstance(result, BaseException):
            self._opened(task)
        self.apply(self.lifecycle.summarized(result, now), now)

    # ---- 6. per contact --------------------------------------------------------------------

    def _start_singles(self, now: float) -> None:
        while self.ready_single and self._room() > 0 and self._gate_allows(now):
            ready = self.ready_single.popleft()
            if not self.ownership.owns(ready.partition, ready.generation):
                self._release({ready.email})
                continue
            if self._stale_verification(ready, now):
                continue
            list_ids = self._list_ids(ready.changes)
            if self.confirm.write_pending(
                ready.changes, ready.generation, list_ids, self._on_written_ahead(ready)
            ):
                self.writing_ahead += 1
            else:
                self._start_single(ready, now)

    def _on_written_ahead(self, ready: _Ready) -> Callable[[], None]:
        def written() -> None:
            self.writing_ahead -= 1
            if self.ownership.owns(ready.partition, ready.generation):
                self._start_single(ready, self.clock_now())
            else:
                self._release({ready.email})

        return written

    def _start_single(self, ready: _Ready, now: float) -> None:
        contact_id = next((c.contact_id for c in ready.changes if c.contact_id), None)
        contact_id = contact_id or self._contact_id(ready)
        fields_hash = ready.plan.fields_hash if ready.plan.fields else 0
        task = ApplyTask(ready.email, ready.partition, ready.generation, ready.changes, fields_hash)
        call = apply_contact(
            ready.email, ready.changes, self._list_ids(ready.changes), contact_id, ready.plan.fields
        )
        self._submit(task, call, now)

    def applied(self, task: ApplyTask, result: Any, now: float) -> None:
        if isinstance(result, BaseException):
            logger.error("per-contact work crashed; retrying", exc_info=result)
            outcomes = [
                Outcome(c, OutcomeKind.RETRY, error=ApiError(None, "crash")) for c in task.changes
            ]
        else:
            outcomes = result
        self._opened(task)
        for outcome in outcomes:
            if outcome.list_gone:
                self.list_gone(outcome.list_gone, now)
        self.confirm.settle(
            outcomes,
            task.generation,
            now,
            fields_hash=task.fields_hash or None,
            list_ids=self._list_ids(task.changes),
        )
        self._release({task.email})

    def _opened(self, task: Task) -> None:
        if task.requests and not task.blocked_reply:
            self.confirm.opened()

    # ---- completions and rebalances ------------------------------------------------------------

    def completed(self, task: Task, result: Any, now: float) -> None:
        if isinstance(task, ApplyTask):
            self.applied(task, result, now)
        elif isinstance(task, ImportTask):
            self.import_submitted(task, result, now)
        elif isinstance(task, PollTask):
            self.polled(task, result, now)
        elif isinstance(task, SummaryTask):
            self.summarized(task, result, now)
        elif isinstance(task, VerifyTask):
            self.verified(task, result, now)
        elif isinstance(task, ProbeTask):
            self.probed(task, result, now)
        elif isinstance(task, RecheckTask):
            self.rechecked(task, result, now)
        elif isinstance(task, ListTask):
            if self.directory.known(task.ref):
                self.list_checked(task, result, now)
            else:
                self.list_resolved(task, result, now)

    def forget(self, partitions: set[int]) -> None:
        """The partitions were handed over: drop what waits for them, release their emails."""

        def mine(partition: int) -> bool:
            return partition in partitions

        for ref in list(self.waiting_lists):
            kept = []
            for generation, group in self.waiting_lists[ref]:
                if mine(group[0].partition):
                    self._release({group[0].email})
                else:
                    kept.append((generation, group))
            if kept:
                self.waiting_lists[ref] = kept
            else:
                del self.waiting_lists[ref]
        for queue in [
            self.ready_single,
            self.ready_bulk,
            self.to_recheck,
            *self.to_verify.values(),
        ]:
            for ready in [r for r in queue if mine(r.partition)]:
                queue.remove(ready)
                self._release({ready.email})
        for ref in [r for r, q in self.to_verify.items() if not q]:
            del self.to_verify[ref]
        for import_id, readies in list(self.preparing.items()):
            if any(mine(r.partition) for r in readies):
                # Not sent yet: its intents name partitions we no longer own. Take it back.
                self.preparing.pop(import_id)
                imp = self.lifecycle.imports.pop(import_id, None)
                for ready in readies:
                    if not mine(ready.partition):
                        self.confirm.requeue(
                            ready.changes, {ready.partition: ready.generation}, 0.0, single=False
                        )
                    self._release({ready.email})
                if imp is not None:
                    for partition in imp.emails:
                        if partition in self.ownership.assigned and not mine(partition):
                            self.ledger.delete_intent(partition, import_id)
        self.apply(self.lifecycle.forget(partitions), 0.0)


def _blocked(error: ApiError) -> bool:
    from service.core.errors import AccountBlocked

    return isinstance(error, AccountBlocked)


def _confirm_list(ref: ListRef, list_id: str) -> acapi.Call[str]:
    """The list's id if it still exists; else the list found (or created) again."""
    if (yield from acapi.list_exists(list_id)):
        return list_id
    raise PermanentApiError(404, "list_missing", "the list was deleted in AC")

"""Asking AC before deciding: exits of our subscriptions, and states a crash left uncertain.

- **Exits** (``Plan.EXIT``): the person may have opted out since the service subscribed them,
  so before an exit is sent AC is asked who on the list is still subscribed, batched per list
  (``verify_exits``: 100 known contact ids per read, one read per email whose id is unknown).
  An exit whose id a completed import reported and ``Importing`` is learning waits for it (up
  to ``AWAIT_ID_SECONDS``; learning then runs at normal priority).
  Still subscribed -> ``UNSUBSCRIBE`` (sent by import or per contact); not subscribed -> nothing
  to undo, recorded, nothing sent. An answer older than ``VERIFY_FRESH_SECONDS`` when its
  unsubscribe is about to leave (it waited for an import slot, a retry) is asked again
  (``stale``): the window in which a person's own opt-out could be taken for ours stays short.
- **Uncertain states** (``Plan.RECHECK``): a write of ours was never confirmed (a crash came
  between the write and its record). The email's memberships are read (no write is announced
  first), the state resolved in the ledger (``rechecked``), and the group decided again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.core import acapi
from service.core.bulk import Verified, verify_exits
from service.core.coalesce import ListRef, PendingChange
from service.core.ledger import Known, Plan, SetBy, rechecked
from service.pipeline.desk import Desk, LearnBatch, Ready, Route
from service.pipeline.dispatch import RecheckTask, VerifyTask

VERIFY_GATHER_SECONDS = 0.2
VERIFY_BATCH = 250
VERIFY_FRESH_SECONDS = 10.0  # an exit's "still subscribed" is trusted this long
AWAIT_ID_SECONDS = 600.0  # an exit waits at most this long for its id to be learned
NOT_SUBSCRIBED = Known(2, SetBy.UNKNOWN, True)  # an exit found nothing of ours to undo


@dataclass
class Verification:
    desk: Desk
    route: Route
    exits: dict[ListRef, deque[Ready]] = field(default_factory=dict)
    uncertain: deque[Ready] = field(default_factory=deque)
    # Exits whose contact id an import reported and ``Importing`` is still learning, by email
    # (insertion order is arrival order: the oldest wait longest).
    awaiting: dict[str, Ready] = field(default_factory=dict)

    def pending(self) -> int:
        queues = (*self.exits.values(), self.uncertain, self.awaiting.values())
        return sum(len(r.changes) for q in queues for r in q)

    def exit(self, ready: Ready) -> None:
        desk = self.desk
        if ready.email in desk.learning and desk.contact_id(ready.email, ready.partition) is None:
            # Its id is being learned (a hundred to a read): asked by id once it is, rather
            # than alone by email now (one read per exit: a first load's exits would cost ten
            # times the reads of learning every id).
            self.awaiting[ready.email] = ready
            return
        target = next(c.target for c in ready.changes if c.plan is Plan.EXIT)
        self.exits.setdefault(target, deque()).append(ready)

    def awaiting_ids(self) -> bool:
        return bool(self.awaiting)

    def awaited_batches(self, learning: Mapping[str, LearnBatch]) -> list[LearnBatch]:
        """The learning batches holding the ids exits wait for, oldest exit first."""
        found = (learning.get(email) for email in self.awaiting)
        return [batch for batch in found if batch is not None and batch.ids]

    def ids_learned(self, emails: set[str], found: Mapping[str, str]) -> None:
        """``Importing`` learned these emails' ids (``found``) or gave up on them: their exits
        are asked now (by id when found)."""
        for email in emails:
            ready = self.awaiting.pop(email, None)
            if ready is None:
                continue
            contact_id = found.get(email)
            if contact_id is not None:
                for change in ready.changes:
                    change.contact_id = change.contact_id or contact_id
            self._queue(ready)

    def _queue(self, ready: Ready) -> None:
        target = next(c.target for c in ready.changes if c.plan is Plan.EXIT)
        self.exits.setdefault(target, deque()).append(ready)

    def _expire_awaiting(self, now: float, *, flush: bool) -> None:
        """Exits that waited long enough for their id are asked by email; all of them when
        shutting down (no learning starts then)."""
        while self.awaiting:
            email, ready = next(iter(self.awaiting.items()))
            if not flush and now - ready.since < AWAIT_ID_SECONDS:
                return
            del self.awaiting[email]
            self._queue(ready)

    def recheck(self, ready: Ready) -> None:
        self.uncertain.append(ready)

    def stale(self, ready: Ready, now: float) -> bool:
        """True (and decided again) when an unsubscribe's "still subscribed" is too old: the
        group goes back through the plan (which asks again, or first reads AC when a write of
        ours since left the state uncertain)."""
        if not any(
            c.plan is Plan.UNSUBSCRIBE and now - c.verified_at > VERIFY_FRESH_SECONDS
            for c in ready.changes
        ):
            return False
        self.route(ready.generation, ready.changes, now)
        return True

    def start(self, now: float, *, flush: bool) -> None:
        self._start_rechecks()
        self._expire_awaiting(now, flush=flush)
        for ref in list(self.exits):
            queue = self.exits[ref]
            while queue and self.desk.room() > 0:
                if not flush and len(queue) < 100 and now - queue[0].since < VERIFY_GATHER_SECONDS:
                    break
                batch = self._batch(queue)
                if not queue:
                    del self.exits[ref]
                if batch:
                    self._ask(ref, batch)
                if ref not in self.exits:
                    break

    def _batch(self, queue: deque[Ready]) -> list[Ready]:
        """Up to ``VERIFY_BATCH`` exits of one list (``verify_exits`` chooses how to ask)."""
        batch: list[Ready] = []
        while queue and len(batch) < VERIFY_BATCH:
            ready = queue.popleft()
            if self.desk.owns(ready):
                batch.append(ready)
        return batch

    def _ask(self, ref: ListRef, batch: list[Ready]) -> None:
        list_id = self.desk.directory.get(ref)
        assert list_id is not None, "lists are resolved before their changes are decided"
        emails = {
            r.email: self.desk.contact_id(r.email, r.partition)
            or next((c.contact_id for c in r.changes if c.contact_id), None)
            for r in batch
        }
        task = VerifyTask(ref, list_id, [(r.generation, r.changes) for r in batch])
        self.desk.submit(task, verify_exits(list_id, emails))

    def verified(self, task: VerifyTask, result: Any, now: float) -> None:
        desk = self.desk
        if not isinstance(result, Verified):
            for generation, changes in task.groups:
                desk.fail(changes, result, generation, now, "exit verification")
                desk.release({changes[0].email})
            return
        desk.opened(task)
        for generation, changes in task.groups:
            email = changes[0].email
            if not desk.ownership.owns(changes[0].partition, generation):
                desk.release({email})
                continue
            if email in result.unasked:
                self.route(generation, changes, now)  # asked in a later verification
                continue
            contact_id = result.subscribed.get(email)
            done: list[PendingChange] = []
            for change in changes:
                if change.plan is Plan.EXIT and change.target == task.ref:
                    if contact_id is None:
                        done.append(change)
                        continue
                    change.plan = Plan.UNSUBSCRIBE
                    change.contact_id = contact_id
                    change.verified_at = now
            if contact_id is not None:
                # Learned (an import does not say which id is whose): kept in the ledger, so
                # the next exit of this contact is asked by id, a hundred to a request.
                desk.confirm.remember_contact(email, changes[0].partition, generation, contact_id)
            if done:
                known = {i: NOT_SUBSCRIBED for i in range(len(done))}
                desk.confirm.record(done, known, generation, list_ids=desk.list_ids(done))
            rest = [c for c in changes if c not in done]
            if rest:
                self.route(generation, rest, now)
            else:
                desk.release({email})

    # ---- uncertain states ----------------------------------------------------------------

    def _start_rechecks(self) -> None:
        while self.uncertain and self.desk.room() > 0:
            ready = self.uncertain.popleft()
            if not self.desk.owns(ready):
                continue
            task = RecheckTask(ready.email, ready.partition, ready.generation, ready.changes)
            contact_id = self.desk.contact_id(ready.email, ready.partition)
            self.desk.submit(task, acapi.memberships(ready.email, contact_id))

    def rechecked(self, task: RecheckTask, result: Any, now: float) -> None:
        desk = self.desk
        if isinstance(result, BaseException):
            desk.fail(task.changes, result, task.generation, now, "recheck")
            desk.release({task.email})
            return
        desk.opened(task)
        contact_id, lists = result
        known: dict[str, Known | None] = {}
        for change in task.changes:
            state = change.previous
            if state is None or not state.pending:
                continue
            list_id = desk.directory.get(change.target)
            membership = lists.get(list_id) if list_id is not None else None
            known[state.list] = rechecked(
                state,
                membership.status if membership else None,
                membership.unsubscribed_at if membership else None,
            )
        desk.confirm.resolve(task.email, task.partition, task.generation, known, contact_id)
        if desk.ownership.owns(task.partition, task.generation):
            self.route(task.generation, task.changes, now)
        else:
            desk.release({task.email})

    def forget(self, partitions: set[int]) -> None:
        for queue in (*self.exits.values(), self.uncertain):
            for ready in [r for r in queue if r.partition in partitions]:
                queue.remove(ready)
                self.desk.release({ready.email})
        for email, ready in list(self.awaiting.items()):
            if ready.partition in partitions:
                del self.awaiting[email]
                self.desk.release({email})
        for ref in [r for r, q in self.exits.items() if not q]:
            del self.exits[ref]

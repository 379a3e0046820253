"""Learning contact ids after imports: which id AC gave each imported email.

``import/info`` reports the ids an import created or found, not whose they are. An exit that
follows is asked about by id (a hundred to a request) once its id is known, else by email (one
each). So the ids of completed imports (``Learn`` actions) are read back a hundred at a time
(``GET /contacts?ids[]=``: id and email), when a request slot is free:
- at background priority, only in slots nobody else waits for; at normal priority while an
  exit waits for one of these ids;
- while a drain's imports are on their way, not for the first ``LEARN_DEFER_SECONDS`` after an
  import completed, and after that never while a poll is in flight or due within
  ``LEARN_YIELD_SECONDS``;
- bounded: at most ``MAX_TO_LEARN`` ids wait; the oldest batches are dropped (their emails'
  exits are then asked by email).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.core import acapi
from service.core.contact_ids import IdQueue
from service.pipeline.desk import Desk, LearnBatch
from service.pipeline.dispatch import LearnTask
from service.pipeline.imports import ImportLifecycle
from service.pipeline.verify import Verification

MAX_TO_LEARN = 200_000  # ids, ~130 bytes each with their email (~26 MB): a first load's worth
LEARN_DEFER_SECONDS = 60.0  # background learning waits this long while imports are sent
LEARN_YIELD_SECONDS = 2.0  # and, after that, never takes a slot a poll due this soon needs


@dataclass
class Learning:
    desk: Desk
    lifecycle: ImportLifecycle
    verification: Verification
    draining: Callable[[], bool]  # imports are on their way (ready, prepared or outstanding)
    # Contact ids completed imports reported, with the emails they may belong to (bounded).
    to_learn: deque[LearnBatch] = field(default_factory=deque)

    def add(self, ids: list[str], emails: Mapping[str, tuple[int, int]], now: float) -> None:
        """An import completed with these ids for these emails (in an order AC does not say)."""
        batch = LearnBatch(IdQueue(ids), dict(emails), since=now)
        self.to_learn.append(batch)
        for email in batch.emails:
            self.desk.learning[email] = batch
        # Bounded: the oldest batches are dropped (their emails' exits are asked by email).
        while sum(len(b.ids) for b in self.to_learn) > MAX_TO_LEARN:
            dropped = self.to_learn.popleft()
            dropped.ids.clear()
            if dropped.done():
                self._woken({e for e, b in self.desk.learning.items() if b is dropped}, {})

    def start(self, now: float) -> None:
        """One read of up to 100 ids at a time. At background priority it takes a request slot
        only when nothing else waits for one (imports and their polls leave about a third of
        the budget free at full speed, so a first load learns most of its ids for free); while
        an exit waits for one of these ids, at normal priority: a read of 100 ids then saves
        up to 100 reads of one email each. While a drain's imports are on their way, not for
        the first ``LEARN_DEFER_SECONDS`` (a burst's drain is its requests: a read taken in a
        gap between its imports and polls moved its last confirmation a slot later each), and
        after that never while a poll is in flight or due within ``LEARN_YIELD_SECONDS``: the
        500,000-event load's last 6 s held 9 reads between its last polls."""
        if not self.to_learn:
            return
        urgent = self.verification.awaiting_ids()
        if not urgent and self.draining():
            if now - self.to_learn[0].since < LEARN_DEFER_SECONDS:
                return
            if self.lifecycle.poll_near(now, LEARN_YIELD_SECONDS):
                return
        if len(list(self.desk.dispatcher.tasks(LearnTask))) >= (2 if urgent else 1):
            return
        if self.desk.room() < 2:
            return
        ids: list[str] = []
        emails: dict[str, tuple[int, int]] = {}
        batches: list[tuple[LearnBatch, int]] = []
        # The batches an exit waits on first, then the oldest.
        waited = {id(b): b for b in self.verification.awaited_batches(self.desk.learning)}
        order = [*waited.values(), *(b for b in self.to_learn if id(b) not in waited)]
        for batch in order:
            taken = 0
            while batch.ids and len(ids) < acapi.IDS_PER_READ:
                ids.append(batch.ids.popleft())
                taken += 1
            if taken:
                batch.asking += taken
                batches.append((batch, taken))
                emails.update(batch.emails)
            if len(ids) >= acapi.IDS_PER_READ:
                break
        while self.to_learn and not self.to_learn[0].ids:
            self.to_learn.popleft()  # fully asked (answers still counted in ``asking``)
        if not ids:
            return
        priority = acapi.NORMAL if urgent else acapi.BACKGROUND
        call = acapi.contacts_page(ids=ids, priority=priority)
        self.desk.submit(LearnTask(of=emails, batches=batches), call)

    def learned(self, task: LearnTask, result: Any) -> None:
        page = result if isinstance(result, acapi.Page) else None
        if page is not None:
            self.desk.opened(task)
        found = page.contacts if page is not None else {}
        for email, contact_id in found.items():
            where = task.of.get(email)
            if where is not None:
                self.desk.confirm.remember_contact(email, where[0], where[1], contact_id)
        # Not learned on a failed read: those emails' exits are asked by email instead.
        woken: set[str] = set(found)
        for batch, asked in task.batches:
            batch.asking -= asked
            if batch.done():
                woken |= {e for e, b in self.desk.learning.items() if b is batch}
        self._woken(woken, found)

    def _woken(self, emails: set[str], found: Mapping[str, str]) -> None:
        for email in emails:
            self.desk.learning.pop(email, None)
        self.verification.ids_learned(emails, found)

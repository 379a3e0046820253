"""What the delivery stages share: the emails held, the workers, the collaborators.

A *held* email is one taken from the coalescer whose work is not recorded, parked or put back
yet: the coalescer keeps its newer changes aside meanwhile, so no two pieces of work for one
email are ever in flight (``Held``). ``Ready`` is one email's decided changes waiting for the
stage that sends them.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.adapters.ledger_store import LedgerStore
from service.core import acapi
from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.contact_ids import IdQueue
from service.core.errors import AccountBlocked, ApiError
from service.core.lists import ListDirectory
from service.core.outcome import Outcome, OutcomeKind
from service.metrics import Metrics
from service.pipeline.confirm import Confirmer
from service.pipeline.dispatch import Dispatcher, Task
from service.pipeline.ownership import Ownership
from service.pipeline.plan import GroupPlan


@dataclass
class Ready:
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


class OldestFirst:
    """Per-contact work, oldest first: the group whose first change was read earliest goes
    next: the one whose oldest record is nearest its partition's commit point (``distance``,
    taken when queued). Under a crash loop only what gets committed survives a life, and the
    commit waits for the oldest record of each partition: first in, first out would spend a
    short life on records far past the commit point (say, a batch's refused emails retried one
    by one in AC's order) and commit nothing, life after life."""

    def __init__(self, distance: Callable[[int, int], int]) -> None:
        self._distance = distance
        self._heap: list[tuple[int, int, Ready]] = []
        self._seq = itertools.count()

    def append(self, ready: Ready) -> None:
        oldest = min(change.offsets[0] for change in ready.changes)
        rank = self._distance(ready.partition, oldest)
        heapq.heappush(self._heap, (rank, next(self._seq), ready))

    def popleft(self) -> Ready:
        return heapq.heappop(self._heap)[2]

    def remove(self, ready: Ready) -> None:
        self._heap = [item for item in self._heap if item[2] is not ready]
        heapq.heapify(self._heap)

    def __iter__(self) -> Iterator[Ready]:
        return (item[2] for item in self._heap)

    def __len__(self) -> int:
        return len(self._heap)


class Held:
    """``email in held``: taken emails, and emails an adopted import still blocks."""

    def __init__(self, *sets: set[str]) -> None:
        self.sets = sets

    def __contains__(self, email: object) -> bool:
        return any(email in s for s in self.sets)


@dataclass(eq=False)
class LearnBatch:
    """The contact ids one completed import reported, and its emails (AC does not say which id
    is whose): read a hundred at a time until every id was asked."""

    ids: IdQueue
    emails: dict[str, tuple[int, int]]  # email -> (partition, generation)
    asking: int = 0  # ids in reads not answered yet
    since: float = 0.0  # when its import completed

    def done(self) -> bool:
        return not self.ids and not self.asking


@dataclass(frozen=True)
class DeliverySettings:
    concurrency: int
    bulk: bool
    bulk_min: int
    create_lists: bool
    sender_url: str
    sender_reminder: str
    attribute_map: Mapping[str, str]
    field_map: Mapping[str, str]
    stale_tolerance_ms: int | None = None  # the staleness guard (None: off)


Route = Callable[[int, list[PendingChange], float], None]


@dataclass
class Desk:
    settings: DeliverySettings
    coalescer: Coalescer
    ledger: LedgerStore
    directory: ListDirectory
    dispatcher: Dispatcher
    confirm: Confirmer
    ownership: Ownership
    metrics: Metrics
    wall: Callable[[], float]
    monotonic: Callable[[], float]
    held: set[str] = field(default_factory=set)
    adopted: set[str] = field(default_factory=set)  # emails adopted imports still block
    # Per-contact work waiting for its write-ahead's ack (each will take a worker).
    announcing: list[Ready] = field(default_factory=list)
    # Emails of completed imports whose contact ids are still being learned (``Importing``).
    learning: dict[str, LearnBatch] = field(default_factory=dict)

    def room(self, *, polling: bool = False) -> int:
        """Workers free for new work; polls never take the last one (a backlog must not
        stall behind confirmations)."""
        free = self.dispatcher.free - len(self.announcing)
        if polling:
            return max(0, min(free, self.settings.concurrency - 1 - self.dispatcher.polling))
        return free

    def sending(self) -> bool:
        """AC accepts the account (the gate is open)."""
        return not self.confirm.gate.closed

    def submit(self, task: Task, call: acapi.Call[Any]) -> None:
        self.dispatcher.submit(task, call)

    def release(self, emails: set[str]) -> None:
        for email in emails:
            self.held.discard(email)
            self.coalescer.release(email)

    def owns(self, ready: Ready) -> bool:
        """Still ours; else released (the new owner reads those records again)."""
        if self.ownership.owns(ready.partition, ready.generation):
            return True
        self.release({ready.email})
        return False

    def list_ids(self, changes: list[PendingChange]) -> dict[ListRef, str]:
        ids: dict[ListRef, str] = {}
        for change in changes:
            found = self.directory.get(change.target)
            if found is not None:
                ids[change.target] = found
        return ids

    def contact_id(self, email: str, partition: int) -> str | None:
        if email in self.confirm.forgotten_contacts:
            return None
        entry = self.ledger.get(partition, email)
        return entry.contact_id if entry else None

    def opened(self, task: Task) -> None:
        """A task's requests got answers that were not refusals: the account works."""
        if task.requests and not task.blocked_reply:
            self.confirm.opened()

    def fail(
        self, changes: list[PendingChange], result: Any, generation: int, now: float, what: str
    ) -> None:
        """A task for these changes failed before AC settled anything: retry them (or hold
        them at the gate). A refused read is retried too: reads park nothing."""
        error = error_of(result, what)
        kind = OutcomeKind.BLOCKED if isinstance(error, AccountBlocked) else OutcomeKind.RETRY
        for change in changes:
            self.confirm.failed(Outcome(change, kind, error=error), generation, now)


def error_of(result: Any, what: str) -> ApiError:
    """The ``ApiError`` a task ended with (a crash of our own code counts as a retry)."""
    if isinstance(result, ApiError):
        return result
    import logging

    logging.getLogger(__name__).error("%s crashed", what, exc_info=result)
    return ApiError(None, "crash")

"""The worker pool's bookkeeping: typed tasks in flight, the emails they hold, their results.

A task is one piece of AC work (a sans-IO ``Call``) with what the loop needs to act on its
result: the changes it carries, the partition generations it was started under, the emails it
keeps busy. ``Dispatcher.submit`` hands it to the ``Executor`` (threads in production, virtual
time in the simulation); ``completed`` returns the finished ones with their result (or the
exception their call raised). The loop thread is the only one that touches this state.

Invariant: an email is in at most one task at a time (``busy``), so AC never sees two requests
for one email at once and no two writes for one email can land out of order.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.adapters.executor import Executor, Handle
from service.core.acapi import ApiCall, Call, Reply
from service.core.coalesce import ListRef, PendingChange


@dataclass(eq=False)
class Task:
    cancel: threading.Event = field(default_factory=threading.Event, init=False)
    requests: int = field(default=0, init=False)  # requests sent (for the account gate)
    blocked_reply: bool = field(default=False, init=False)

    def partitions(self) -> set[int]:
        return set()

    def emails(self) -> set[str]:
        return set()

    @property
    def polling(self) -> bool:
        """Confirmation work (never allowed to take every worker)."""
        return False

    @property
    def background(self) -> bool:
        """Work no change waits for: it never keeps a commit, a hand-over or a shutdown
        waiting."""
        return False


@dataclass(eq=False)
class ApplyTask(Task):
    email: str
    partition: int
    generation: int
    changes: list[PendingChange]
    fields_hash: int  # of the fields sent (0: none sent)

    def partitions(self) -> set[int]:
        return {self.partition}

    def emails(self) -> set[str]:
        return {self.email}


@dataclass(eq=False)
class RecheckTask(Task):
    """A write of ours may have landed before a crash: read what AC holds for the email."""

    email: str
    partition: int
    generation: int
    changes: list[PendingChange]

    def partitions(self) -> set[int]:
        return {self.partition}

    def emails(self) -> set[str]:
        return {self.email}


@dataclass(eq=False)
class ImportTask(Task):
    import_id: str
    stamp: dict[int, int]
    held: set[str]  # the import's emails (busy until its outcome is recorded)

    def partitions(self) -> set[int]:
        return set(self.stamp)


@dataclass(eq=False)
class PollTask(Task):
    import_id: str
    partitions_: frozenset[int]

    def partitions(self) -> set[int]:
        return set(self.partitions_)

    @property
    def polling(self) -> bool:
        return True


@dataclass(eq=False)
class SummaryTask(Task):
    @property
    def polling(self) -> bool:
        return True


@dataclass(eq=False)
class LearnTask(Task):
    """Which email is which contact id, for ids an import reported (background priority)."""

    of: dict[str, tuple[int, int]]  # email -> (partition, generation)
    batches: list[tuple[Any, int]] = field(default_factory=list)  # (LearnBatch, ids asked)

    @property
    def background(self) -> bool:
        # An id saves a later exit a read; nothing pending depends on it (an exit that waits
        # for one is held by the verification stage, which counts on its own).
        return True


@dataclass(eq=False)
class ProbeTask(Task):
    """While AC refuses the account: one cheap request to see whether it is fixed."""


@dataclass(eq=False)
class ListTask(Task):
    ref: ListRef
    checking: bool = False  # does a known id still exist (before an import uses it)?


@dataclass(eq=False)
class VerifyTask(Task):
    ref: ListRef
    list_id: str
    groups: list[tuple[int, list[PendingChange]]]  # (generation, one email's changes)

    def partitions(self) -> set[int]:
        return {changes[0].partition for _, changes in self.groups}

    def emails(self) -> set[str]:
        return {changes[0].email for _, changes in self.groups}


def counted(call: Call[Any], task: Task) -> Call[Any]:
    """``call``, counting on ``task`` the requests it sends and noting a refused account."""
    try:
        request: ApiCall = next(call)
    except StopIteration as done:
        return done.value
    while True:
        task.requests += 1
        reply: Reply = yield request
        if reply.status in (401, 402, 403) or (
            reply.status is not None and 300 <= reply.status < 400
        ):
            task.blocked_reply = True
        try:
            request = call.send(reply)
        except StopIteration as done:
            return done.value


@dataclass
class Dispatcher:
    executor: Executor
    capacity: int
    inflight: dict[Any, Task] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.capacity - len(self.inflight)

    @property
    def polling(self) -> int:
        return sum(1 for t in self.inflight.values() if t.polling)

    def submit(self, task: Task, call: Call[Any]) -> None:
        handle: Handle[Any] = self.executor.submit(counted(call, task), task.cancel)
        self.inflight[handle] = task
        self.busy |= task.emails()

    def completed(self) -> list[tuple[Task, Any]]:
        """Finished tasks with their result, or the exception their call raised."""
        done = [h for h in self.inflight if h.done()]
        results: list[tuple[Task, Any]] = []
        for handle in done:
            task = self.inflight.pop(handle)
            self.busy -= task.emails()
            try:
                result: Any = handle.result()
            except Exception as exc:  # a bug in a call: its changes are retried
                result = exc
            results.append((task, result))
        return results

    def cancel(self, partitions: set[int]) -> None:
        """Revoked: work of these partitions sends nothing more (the request on the wire
        finishes)."""
        for task in self.inflight.values():
            if task.partitions() & partitions:
                task.cancel.set()

    def working(self) -> bool:
        """Any task in flight that is not background work."""
        return any(not t.background for t in self.inflight.values())

    def working_on(self, partitions: set[int]) -> bool:
        return any(t.partitions() & partitions for t in self.inflight.values())

    def changes_in_flight(self) -> int:
        total = 0
        for task in self.inflight.values():
            if isinstance(task, ApplyTask):
                total += len(task.changes)
            elif isinstance(task, VerifyTask):
                total += sum(len(c) for _, c in task.groups)
        return total

    def tasks(self, kind: type[Task]) -> Iterable[Task]:
        return (t for t in self.inflight.values() if isinstance(t, kind))

"""Lists: found or created before their changes are decided, one lookup per list at a time.

- A list seen in an event is looked up while its first changes wait for the coalescing window
  (``want``), so the first import need not wait for it.
- A group whose list id is not known yet waits here (``wait``); when the lookup answers, it is
  decided again; when the list cannot be found or created (``AC_CREATE_LISTS=false``, too many
  lists), only that list's changes are parked, the group's other changes go on.
- An id not confirmed for ``LIST_VERIFY_SECONDS`` is checked before an import uses it
  (``reverify``): an import skips a list id AC no longer has and says nothing, so a deleted
  list would otherwise be recorded as applied. A per-contact write learns it at once
  (``related_missing`` on the list: ``gone``). Either way the list is found or created again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from service.core import acapi
from service.core.coalesce import ListRef, PendingChange
from service.core.errors import PermanentApiError
from service.core.lists import resolve_list
from service.pipeline.desk import Desk, Ready, Route
from service.pipeline.dispatch import ListTask

logger = logging.getLogger(__name__)

LIST_RETRY_SECONDS = 5.0


@dataclass
class Lists:
    desk: Desk
    route: Route
    wanted: set[ListRef] = field(default_factory=set)
    resolving: set[ListRef] = field(default_factory=set)
    retry_at: dict[ListRef, float] = field(default_factory=dict)
    waiting: dict[ListRef, list[tuple[int, list[PendingChange]]]] = field(default_factory=dict)

    def want(self, ref: ListRef) -> None:
        if not self.desk.directory.known(ref):
            self.wanted.add(ref)

    def missing(self, group: list[PendingChange]) -> ListRef | None:
        return next((c.target for c in group if self.desk.directory.get(c.target) is None), None)

    def wait(self, ref: ListRef, generation: int, group: list[PendingChange]) -> None:
        self.waiting.setdefault(ref, []).append((generation, group))
        self.wanted.add(ref)

    def pending(self) -> int:
        return sum(len(c) for groups in self.waiting.values() for _, c in groups)

    # ---- lookups -------------------------------------------------------------------------

    def start(self, now: float) -> None:
        directory = self.desk.directory
        wanted = sorted(
            (
                ref
                for ref in self.wanted
                if ref not in self.resolving
                and not directory.known(ref)
                and now >= self.retry_at.get(ref, 0.0)
            ),
            key=lambda r: (r.name or "", r.list_id or ""),
        )
        s = self.desk.settings
        for ref in wanted:
            if self.desk.room() <= 0:
                return
            if directory.full():
                self._park(ref, PermanentApiError(None, "list_limit", "MAX_LISTS reached"))
                continue
            self.resolving.add(ref)
            call = resolve_list(
                ref,
                create=s.create_lists,
                sender_url=s.sender_url,
                sender_reminder=s.sender_reminder,
            )
            self.desk.submit(ListTask(ref), call)

    def answered(self, task: ListTask, result: Any, now: float) -> None:
        if task.checking:
            self._checked(task.ref, result, now)
            return
        ref = task.ref
        self.resolving.discard(ref)
        if isinstance(result, str):
            self.desk.directory.learn(ref, result, now)
            self.wanted.discard(ref)
            for generation, group in self.waiting.pop(ref, []):
                if self.desk.ownership.owns(group[0].partition, generation):
                    self.route(generation, group, now)
                else:
                    self.desk.release({group[0].email})
            return
        if isinstance(result, PermanentApiError):
            self.wanted.discard(ref)
            self._park(ref, result)
            return
        for generation, group in self.waiting.get(ref, []):
            mine = [c for c in group if c.target == ref]
            self.desk.fail(mine, result, generation, now, "list lookup")
        self.retry_at[ref] = now + LIST_RETRY_SECONDS
        self._put_back(ref, now)

    def _put_back(self, ref: ListRef, now: float) -> None:
        """The other changes of groups that waited for ``ref`` go back to the coalescer (its
        own changes were settled by the caller)."""
        for generation, group in self.waiting.pop(ref, []):
            rest = [c for c in group if c.target != ref]
            self.desk.confirm.requeue(rest, {group[0].partition: generation}, now, single=False)
            self.desk.release({group[0].email})

    def _park(self, ref: ListRef, error: PermanentApiError) -> None:
        """The list cannot be found or created: only that list's changes are parked."""
        for generation, group in self.waiting.get(ref, []):
            for change in group:
                if change.target == ref:
                    self.desk.confirm.park(change, error, generation)
        self._put_back(ref, 0.0)

    def gone(self, list_id: str) -> None:
        """AC says the list id does not exist: resolve (or create) it again."""
        for ref in self.desk.directory.forget_id(list_id):
            logger.warning(
                "a list was deleted in AC; resolving it again", extra={"list": ref.label()}
            )

    # ---- before an import ------------------------------------------------------------------

    def stale(self, readies: Iterable[Ready], now: float) -> bool:
        return any(self.desk.directory.stale(c.target, now) for r in readies for c in r.changes)

    def reverify(self, readies: Iterable[Ready], now: float) -> None:
        """Check that the lists an import is about to use still exist."""
        directory = self.desk.directory
        for ready in readies:
            for change in ready.changes:
                ref = change.target
                list_id = directory.get(ref)
                if list_id is None or ref in self.resolving or not directory.stale(ref, now):
                    continue
                if self.desk.room() <= 0:
                    return
                self.resolving.add(ref)
                self.desk.submit(ListTask(ref, checking=True), _exists(list_id))

    def _checked(self, ref: ListRef, result: Any, now: float) -> None:
        self.resolving.discard(ref)
        directory = self.desk.directory
        if isinstance(result, str):
            directory.confirm(ref, now)
        elif isinstance(result, PermanentApiError):
            old = directory.get(ref)
            if old is not None:
                self.gone(old)
            self.wanted.add(ref)  # found or created again before its next change is decided
        else:
            self.retry_at[ref] = now + LIST_RETRY_SECONDS
            directory.confirm(ref, now)  # unknown: try again in a while; the import may go

    def forget(self, partitions: set[int]) -> None:
        for ref in list(self.waiting):
            kept = []
            for generation, group in self.waiting[ref]:
                if group[0].partition in partitions:
                    self.desk.release({group[0].email})
                else:
                    kept.append((generation, group))
            if kept:
                self.waiting[ref] = kept
            else:
                del self.waiting[ref]


def _exists(list_id: str) -> acapi.Call[str]:
    """The list's id if it still exists."""
    if (yield from acapi.list_exists(list_id)):
        return list_id
    raise PermanentApiError(404, "list_missing", "the list was deleted in AC")

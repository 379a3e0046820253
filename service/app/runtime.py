"""Settings of the Python runtime for a long-running consumer (process-wide, set once at start),
and the schedule of the cyclic garbage collector.

The cyclic collector is the one that matters. The pipeline keeps up to ``MAX_PENDING_CHANGES``
pending changes alive, each a few container objects, and CPython's collector is driven by
allocations: every young collection walks every container object born since the previous one
and still alive, and older collections walk them again. Under load that is hundreds of thousands
of objects a second that are about to be freed anyway by reference counting (a change lives a
window and an apply, seconds). Measured on the decode-and-coalesce path
(``benchmarks/cpu.py``): with CPython's default thresholds the collector took more than half of
the per-record time; with young collections every 50,000 allocations still 10 to 15 %.

Nothing in the pipeline relies on cycles being freed promptly (pending changes, events and
offsets are acyclic; they are freed by reference counting when taken or completed). The cycles
that do occur (exceptions with their tracebacks, httpx internals) are few. So the collector runs
on a schedule instead, from the runner's loop (``CollectionSchedule``):

- ``gc.freeze()`` at start moves everything alive then (modules, schemas, clients) out of the
  collector's sight for good, and automatic collection is switched off;
- a full collection runs every ``COLLECT_INTERVAL_SECONDS``, or sooner once the number of
  container objects has grown by ``COLLECT_AFTER_OBJECTS`` since the last one (CPython keeps
  that count while automatic collection is off: allocations minus frees). That bounds what
  waits uncollected by time and by count, and it costs one walk of the live set a minute: about
  0.1 s for 100,000 pending changes (measured by ``benchmarks/cpu.py``), instead of a walk of
  every new object.
"""

from __future__ import annotations

import ctypes
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

COLLECT_INTERVAL_SECONDS = 60.0
COLLECT_AFTER_OBJECTS = 1_000_000
TRIM_INTERVAL_SECONDS = 5.0


def tune_gc() -> tuple[int, int, int]:
    """Freeze what start-up made and switch automatic collection off; the runner then calls
    ``Collector.maybe_collect``. Returns the previous thresholds."""
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.disable()
    return previous


@dataclass(slots=True)
class CollectionSchedule:
    """When the next full collection is due. Pure: takes ``now`` and the object count.

    Invariant: after ``collected(now)``, ``due`` is false until ``interval`` has passed or the
    count has reached ``objects``.
    """

    interval: float = COLLECT_INTERVAL_SECONDS
    objects: int = COLLECT_AFTER_OBJECTS
    next_at: float | None = None

    def due(self, now: float, grown: int) -> bool:
        if self.next_at is None:  # the first call starts the clock
            self.next_at = now + self.interval
        return now >= self.next_at or grown >= self.objects

    def collected(self, now: float) -> None:
        self.next_at = now + self.interval


class Collector:
    """The shell around ``CollectionSchedule``: runs ``gc.collect()`` when due, but only while
    automatic collection is off (``tune_gc``); with it on, CPython already collects."""

    def __init__(self, schedule: CollectionSchedule | None = None) -> None:
        self.schedule = schedule if schedule is not None else CollectionSchedule()

    def maybe_collect(
        self, now: float, quiesce: Callable[[], None] | None = None
    ) -> tuple[int, float] | None:
        """Collect if due: (unreachable objects found, pause in seconds), else None.
        ``quiesce`` runs first: the collection holds every thread (the GIL), so whatever must
        not be caught half-way (a request allowed to leave) is settled there."""
        if gc.isenabled() or not self.schedule.due(now, gc.get_count()[0]):
            return None
        if quiesce is not None:
            quiesce()
        began = time.perf_counter()
        found = gc.collect()
        pause = time.perf_counter() - began
        self.schedule.collected(now)
        return found, pause


class MemoryTrimmer:
    """Gives the C heap's free pages back to the system every ``interval`` seconds (glibc's
    ``malloc_trim(0)``; elsewhere, nothing).

    Why: what the pipeline frees in bursts (a fetch's records decoded and superseded, a batch
    of imports' payloads, a dict's old table after it grew) stays in the process as free heap
    unless something returns it: glibc gives back only the top of a heap on its own, and
    librdkafka's threads allocate in arenas of their own. On the 500,000-event benchmark the
    resident set's plateau in the drain's last third was 249-252 MB without it and 197-218 MB
    with it. The call releases the GIL (ctypes), so only allocations in other threads wait
    for it, a few milliseconds.

    Invariant: after ``maybe_trim(now)`` returned a result, the next one is ``interval`` later.
    """

    def __init__(self, interval: float = TRIM_INTERVAL_SECONDS, libc: Any = None) -> None:
        self.interval = interval
        self.next_at: float | None = None
        self._trim: Callable[[int], int] | None = None
        try:
            # dlopen(NULL): the symbols the process already has (glibc's, when it is glibc).
            library = libc if libc is not None else ctypes.CDLL(None)
            self._trim = library.malloc_trim
        except (AttributeError, OSError, TypeError):
            self._trim = None  # not glibc (musl, macOS): nothing to call

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self, now: float, *, force: bool = False) -> float | None:
        """Trim if due (or ``force``): the seconds the call took, else None."""
        if self._trim is None:
            return None
        if self.next_at is None:
            self.next_at = now + self.interval
        if now < self.next_at and not force:
            return None
        began = time.perf_counter()
        self._trim(0)
        self.next_at = now + self.interval
        return time.perf_counter() - began

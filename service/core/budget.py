"""The account's budgets as pure arithmetic over ``now``: requests (``LeakyBucket``) and
imports (``ImportBudget``). The thread-safe shell that makes workers wait is
``service/adapters/ratelimit.py``; the simulation drives the same arithmetic on virtual time.

**Requests: a leaky bucket with no burst.** Requests leave one every ``interval`` seconds,
never two closer together, and none before a Retry-After pause ends. ActiveCampaign documents
5 requests per second per account and no burst, so the bucket holds exactly one request.
``interval = 1/rate + guard``: the guard absorbs the jitter between the moment we send and the
moment AC counts the request (a thread woken late, an upload that takes longer), so that no
one-second window at AC's side ever holds more than ``rate`` requests. With sends allowed up to
``tolerance = rate * guard / 2`` late (half the slack), six consecutive slots span at least
``5 * interval - tolerance``, so AC's window stays at ``rate`` as long as the network's jitter
(the spread of send-to-arrival delays) is under ``rate * guard / 2`` too: 100 ms at the default
guard of 40 ms and 5/s.

**One budget per account across replicas.** ``share(owned, total)`` switches the bucket to
wall-clock-aligned ticks of ``interval`` seconds. Every ``tools_every``-th tick belongs to the
operator's tools (``reconcile``, ``forget``), the others to partitions in turn; a replica may
only start a request in a tick of a partition it owns. Kafka gives each partition to exactly
one group member, so at most one request starts per tick account-wide, and each replica's
share follows its partitions through every rebalance. A replica that owns nothing sends
nothing. Replicas need clocks within tens of milliseconds of each other (NTP); a replica's
unused ticks are not lent to the others.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

TOOLS = -2  # the owner of the tools' ticks
POOL = -1  # the import history's key when the budget is not shared by partitions


class LeakyBucket:
    """Invariant: two granted slots are at least ``interval`` apart; with a share, every slot
    starts on a tick this owner holds."""

    def __init__(self, rate: float, guard: float = 0.04, *, tools_every: int = 0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if tools_every == 1:
            raise ValueError("tools_every must be 0 (none) or at least 2")
        self.guard = guard
        self.interval = 1.0 / rate + guard
        self.tools_every = tools_every
        self.next_free = float("-inf")
        self.paused_until = float("-inf")
        self.epoch = 0  # bumped when booked slots become void (a pause, a new share)
        self.owned: frozenset[int] | None = None  # None: every tick is ours
        self.total = 0

    @property
    def rate(self) -> float:
        """Slots per second this owner may use."""
        if self.owned is None:
            return 1.0 / self.interval
        tools = 1.0 / self.tools_every if self.tools_every else 0.0
        if self.owned == frozenset({TOOLS}):
            return tools / self.interval
        return (1.0 - tools) * len(self.owned) / max(1, self.total) / self.interval

    @property
    def rate_nominal(self) -> float:
        return 1.0 / (self.interval - self.guard)

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        """Own only the ticks of ``owned`` partitions out of ``total`` (``{TOOLS}``: the tools'
        ticks; None: all ticks). Slots booked under the old share are void."""
        if owned is not None and total <= 0 and owned != frozenset({TOOLS}):
            owned = frozenset()  # the partition count is unknown: own nothing until it is
        if (owned, total) != (self.owned, self.total):
            self.epoch += 1
        self.owned = owned
        self.total = total

    def peek(self, now: float) -> float:
        """When the next slot would start (``inf``: none while nothing is owned)."""
        start = max(now, self.next_free, self.paused_until)
        if self.owned is not None:
            start = self._next_owned_tick(start)
        return start

    def reserve(self, now: float) -> float:
        """Book the next free slot; return when it starts (``>= now``; ``inf``: none)."""
        start = self.peek(now)
        if math.isfinite(start):
            self.next_free = start + self.interval
        return start

    @property
    def tolerance(self) -> float:
        """How late a send may leave and still use its slot: half the slack the guard buys
        (see the module docstring). Without a guard every send keeps its slot."""
        if self.guard <= 0:
            return float("inf")
        return self.rate_nominal * self.guard / 2

    def on_time(self, start: float, now: float) -> bool:
        """May the slot that started at ``start`` still be used at ``now``? Later than
        ``tolerance`` (a thread woken late) it is void: book the next one instead."""
        return now - start <= self.tolerance + 1e-9

    def leaving(self, start: float, now: float) -> bool:
        """A request given the slot that started at ``start`` is about to be written at
        ``now``. Later than ``tolerance``: the slot is void (book the next one). Later than
        the guard: it goes, and the next slots keep ``interval`` from when it really left
        (slots booked are void: a new epoch). A thread held up between its slot and its send
        (the GIL, a busy core) otherwise left ~0.2 s late, right before the next slot's
        request: AC counted 6 in one second on the 500,000-event benchmark."""
        if not self.on_time(start, now):
            return False
        self.sent(start, now)
        return True

    def sent(self, start: float, now: float) -> None:
        """The request given the slot that started at ``start`` was written by ``now`` (its
        last byte handed to the network). Later than the guard: the next slots keep
        ``interval`` from ``now`` (slots booked are void: a new epoch). ``leaving`` covers a
        hold-up before the write; this one a hold-up during it (the thread waiting for the
        GIL between the socket writes while the main thread decodes), which otherwise puts
        the request right before the next slot's."""
        if now - start > self.guard:
            self.next_free = max(self.next_free, now + self.interval)
            self.epoch += 1

    def owner(self, tick: int) -> int:
        """Who owns wall-clock tick ``tick``: ``TOOLS`` or a partition."""
        every = self.tools_every
        if every and tick % every == every - 1:
            return TOOLS
        slot = tick - tick // every if every else tick
        return slot % max(1, self.total)

    def _next_owned_tick(self, earliest: float) -> float:
        assert self.owned is not None
        if not self.owned:
            return math.inf
        # Tolerance in ticks, not seconds: at wall-clock magnitudes (~1.8e9 s) ``k * interval /
        # interval`` is off by up to ~1e-6, and a 1e-9 tolerance skipped a quarter of all ticks.
        tick = math.ceil(earliest / self.interval - 1e-6)
        span = max(1, self.total) * max(1, self.tools_every) + 1
        for step in range(span):
            if self.owner(tick + step) in self.owned:
                return (tick + step) * self.interval
        return math.inf  # owns only partitions that do not exist

    def pause(self, until: float) -> None:
        """No slot may start before ``until`` (a 429's Retry-After). Slots booked are void."""
        if until > self.paused_until:
            self.paused_until = until
            self.next_free = max(self.next_free, until)
            self.epoch += 1

    def paused(self, now: float) -> bool:
        return now < self.paused_until


class ImportBudget:
    """May an import be sent now? AC allows 100 multi-contact imports in any 60 s.

    The budget is a sliding window, so a backlog after a quiet minute goes out as fast as the
    request budget allows (a burst of up to ``per_minute``), and a long one at ``per_minute`` a
    minute. What makes a burst safe across replicas, rebalances and restarts is that the
    window's history is kept **per partition** and moves with the partition:

    - one import costs ``total`` units; each of the ``total`` partitions holds ``per_minute``
      (less a margin of 2) units per window. Whatever the assignment, the units all partitions
      spend in any window add up to at most ``per_minute`` imports account-wide;
    - a replica pools the units of the partitions it owns (an import's contacts may come from
      any of them) and charges each import to the owned partitions with the most units left;
    - a partition's charges of the last window are written to the partition's ledger
      (``history``) on every charge, *before* the import is sent, and read back by its next
      owner (``adopt``) before the partition may be charged again. Until adopted a partition
      lends nothing. ``adopt`` needs the partition count (``share`` first): a history is kept
      in imports and turned into this budget's units on adoption;
    - a charge counts from when the import is taken until ``settle`` records when its request
      returned: AC counted it on arrival, which is no later than that. Until settled (or if its
      owner crashed) it is dated ``in_flight`` seconds ahead, longer than a request can be on
      the wire. ``skew`` covers clocks between replicas (NTP).

    Invariant (property-tested with transfers between replicas, and in the simulation with
    crashes): at any arrival time, at most ``per_minute`` imports arrived in the preceding 60 s.
    """

    def __init__(
        self,
        per_minute: int = 100,
        *,
        margin: int = 2,
        window: float = 60.0,
        skew: float = 0.5,
        in_flight: float = 60.0,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        # A margin below AC's figure: AC's window edge and ours need not agree to the millisecond.
        self.per_minute = max(1, per_minute - margin)
        self.window = window + skew
        self.in_flight = in_flight
        self.owned: frozenset[int] | None = None  # None: one pool, the whole budget is ours
        self.total = 1
        self.paused_until = float("-inf")
        self._adopted: set[int] = {POOL}
        self._history: dict[int, list[list[float]]] = {POOL: []}  # partition -> [[time, units, id]]
        self._ids = itertools.count(1)

    def share(self, owned: frozenset[int] | None, total: int) -> None:
        """Own the units of ``owned`` out of ``total`` partitions (None: one pool of all).
        Histories of partitions no longer owned are dropped (their next owner adopts them from
        the ledger); the units of a partition already adopted are rescaled to the new count."""
        old_total = self.total
        if owned is None or total <= 0:
            self.owned, self.total = None, 1
            self._adopted.add(POOL)
            self._history.setdefault(POOL, [])
        else:
            self.owned, self.total = owned, total
            self._adopted.discard(POOL)
            self._history.pop(POOL, None)
        if self.total != old_total:
            for history in self._history.values():
                for charge in history:
                    charge[1] = charge[1] * self.total / old_total
        for partition in list(self._history):
            if partition != POOL and (self.owned is None or partition not in self.owned):
                self._history.pop(partition)
                self._adopted.discard(partition)

    def adopt(self, partition: int, charges: Sequence[tuple[float, float]]) -> None:
        """The partition's history as its previous owner wrote it: (time, imports) pairs.
        Call after ``share`` gave the partition count (a unit is one import / ``total``)."""
        self._history[partition] = [
            [at, float(math.ceil(imports * self.total - 1e-9)), 0.0] for at, imports in charges
        ]
        self._adopted.add(partition)

    def adopted(self, partition: int) -> bool:
        return partition in self._adopted

    def history(self, partition: int, now: float) -> list[tuple[float, float]]:
        """The partition's live charges as (time, imports), for its next owner."""
        return [(at, units / self.total) for at, units, _ in self._live(partition, now)]

    @property
    def capacity(self) -> int:
        """Imports this replica may start per minute (at most)."""
        if self.owned is None:
            return self.per_minute
        return self.per_minute * len(self.owned) // self.total

    def _pools(self) -> list[int]:
        if self.owned is None:
            return [POOL]
        return [p for p in self.owned if p in self._adopted]

    def _live(self, partition: int, now: float) -> list[list[float]]:
        history = self._history.get(partition, [])
        live = [charge for charge in history if charge[0] > now - self.window]
        if len(live) != len(history):
            self._history[partition] = live
        return live

    def _left(self, partition: int, now: float) -> float:
        return self.per_minute - sum(charge[1] for charge in self._live(partition, now))

    def left(self, now: float) -> float:
        """Imports the owned partitions could still pay for now (a pause aside)."""
        return sum(max(0.0, self._left(p, now)) for p in self._pools()) / self.total

    def available(self, now: float) -> bool:
        """True when the owned partitions have an import's units left (and no pause is on)."""
        if now < self.paused_until:
            return False
        return sum(self._left(p, now) for p in self._pools()) >= self.total - 1e-9

    def take(self, now: float) -> tuple[int, list[int]]:
        """Charge one import (the caller checked ``available``; an extra request AC counted is
        charged even when nothing is left). Returns the charge's id and the partitions charged."""
        charge_id = next(self._ids)
        due = float(self.total)
        pools = sorted(self._pools(), key=lambda p: (-self._left(p, now), p))
        charged: list[int] = []
        for partition in pools:
            units = min(due, max(0.0, self._left(partition, now)))
            if units <= 0:
                break
            self._history[partition].append([now + self.in_flight, units, float(charge_id)])
            charged.append(partition)
            due -= units
            if due <= 0:
                break
        if due > 0 and pools:  # nothing left: charge the overrun too (AC counted it)
            self._history[pools[0]].append([now + self.in_flight, due, float(charge_id)])
            charged.append(pools[0])
        return charge_id, sorted(set(charged))

    def settle(self, charge_id: int, at: float) -> list[int]:
        """The import's request returned at ``at``: AC counted it by then. Returns the
        partitions whose history changed."""
        changed: list[int] = []
        for partition, history in self._history.items():
            for charge in history:
                if charge[2] == charge_id:
                    charge[0] = at
                    changed.append(partition)
        return changed

    def pause(self, until: float) -> None:
        """AC answered "Rate limit exceeded.": no import until ``until``."""
        self.paused_until = max(self.paused_until, until)

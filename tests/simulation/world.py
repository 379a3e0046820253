"""Virtual time and actors: the floor the simulated Kafka, AC and replicas stand on.

One OS thread runs everything. The scheduler (``World.run``) pops the earliest event from a heap
and runs it; an event is a callback or "resume this actor". An *actor* is a greenlet running
ordinary blocking code (a replica's real ``Loop.run``); when that code waits (``World.sleep``:
the replica's clock, the simulated consumer's ``consume(timeout)``, the producer's ``flush``), the
actor schedules its own resumption and switches back to the scheduler. Nothing else ever
blocks, so a history is a pure function of the seed: replay it and everything happens again,
in the same order, at the same virtual times.

``kill`` is a process crash: the actor is never resumed (its greenlet is kept, unreferenced by
the heap, so Python never runs its ``finally`` blocks), and whatever it had scheduled is void.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import greenlet


class SimCrash(BaseException):
    """Raised into code that runs on behalf of a crashed actor (never caught by the service)."""


@dataclass(eq=False)
class Actor:
    name: str
    glet: greenlet.greenlet
    alive: bool = True
    finished: bool = False
    error: BaseException | None = None
    result: Any = None


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    action: Callable[[], None] = field(compare=False)
    owner: Actor | None = field(compare=False, default=None)


class World:
    def __init__(self, seed: int, start: float = 1_000_000.0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = start
        self._events: list[_Event] = []
        self._seq = itertools.count()
        self._main = greenlet.getcurrent()
        self.current: Actor | None = None
        self.actors: list[Actor] = []
        self.graveyard: list[Actor] = []  # killed actors, kept so their greenlets never unwind
        self.steps = 0

    # ---- scheduling ----------------------------------------------------------------------

    def at(self, when: float, action: Callable[[], None], owner: Actor | None = None) -> None:
        heapq.heappush(self._events, _Event(max(when, self.now), next(self._seq), action, owner))

    def after(self, delay: float, action: Callable[[], None], owner: Actor | None = None) -> None:
        self.at(self.now + max(0.0, delay), action, owner)

    def spawn(self, name: str, body: Callable[[], Any], delay: float = 0.0) -> Actor:
        def run() -> None:
            try:
                actor.result = body()
            except BaseException as exc:
                actor.error = exc
            finally:
                actor.finished = True
                actor.alive = False

        actor = Actor(name, greenlet.greenlet(run, parent=self._main))
        self.actors.append(actor)
        self.after(delay, lambda: self._resume(actor), actor)
        return actor

    def _resume(self, actor: Actor) -> None:
        if not actor.alive:
            return
        previous, self.current = self.current, actor
        try:
            actor.glet.switch()
        finally:
            self.current = previous

    def sleep(self, seconds: float) -> None:
        """Called by an actor: wait ``seconds`` of virtual time (others run meanwhile)."""
        actor = self.current
        if actor is None:
            raise RuntimeError("sleep() outside an actor")
        self.after(seconds, lambda: self._resume(actor), actor)
        self._main.switch()
        if not actor.alive:
            raise SimCrash(actor.name)

    def kill(self, actor: Actor) -> None:
        actor.alive = False
        self.graveyard.append(actor)

    # ---- the loop ----------------------------------------------------------------------

    def run(self, until: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Run events until virtual time ``until`` or ``stop()``."""
        while self._events and not stop():
            event = self._events[0]
            if event.at > until:
                break
            heapq.heappop(self._events)
            if event.owner is not None and not event.owner.alive:
                continue
            self.now = event.at
            self.steps += 1
            event.action()
            for actor in self.actors:
                if actor.error is not None and not isinstance(actor.error, SimCrash):
                    error, actor.error = actor.error, None
                    raise error
        self.now = max(self.now, min(until, self._events[0].at if self._events else until))

    def uniform(self, low: float, high: float) -> float:
        return self.rng.uniform(low, high)

    def chance(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

"""One history: replicas of the real service on a simulated cluster and account, a workload,
a fault schedule, and the invariants checked during and after the run.

``run_history(seed)`` is a pure function of the seed (and the profile): it builds the world,
produces the workload on virtual time, starts replicas, injects faults (crashes, lost
partitions, rebalances, AC 5xx/timeouts/429 storms/outages/stuck imports, failed and delayed
ledger and DLQ writes, failed commits, clock skew), lets everything drain, and returns a
``Report``. Any broken invariant is a ``Violation`` naming the seed and the command that
replays it (``make soak SEED=...``).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from service.adapters.kafka import AckedProducer
from service.app.settings import Settings
from service.core.codec import EventDecoder, load_reader_schema
from service.core.ledger import LedgerEntry, newest
from service.core.ledger_codec import LedgerCodec
from service.metrics import Metrics
from service.pipeline.loop import Loop
from service.pipeline.stages import Ports
from tests.simulation.ac import Network, SimAccount, SimExecutor, SimLimiter
from tests.simulation.kafka import Record, SimCluster
from tests.simulation.model import STALE_TOLERANCE_MS, Oracle, Workload, make_workload
from tests.simulation.world import Actor, World

TOPIC = "cdp.audience"
GROUP = "ac-sync"
TOKEN = "sim-token"
READER = load_reader_schema(logical_types=False)


class Violation(AssertionError):
    def __init__(self, seed: int, invariant: str, detail: str) -> None:
        super().__init__(f"seed {seed}: {invariant}: {detail}\n  replay: make soak SEED={seed}")
        self.seed = seed
        self.invariant = invariant


@dataclass
class Profile:
    """The shape of a history; ``draw`` picks one at random from the seed."""

    partitions: int = 4
    replicas: int = 2
    emails: int = 60
    audiences: int = 3
    events: int = 600
    duration: float = 60.0  # seconds over which events are produced
    backlog: float = 0.5  # share of events already in the topic when the service starts
    crashes: int = 1
    faults: int = 3
    skew: float = 0.01  # clock skew between replicas, seconds (the documented bound)
    drain_limit: float = 900.0  # virtual seconds allowed to drain after the last fault
    max_pending: int = 2000
    bulk_min: int = 10
    crash_every: float = 0.0  # kill a replica this often (virtual seconds) until drained

    @classmethod
    def draw(cls, rng: random.Random) -> Profile:
        return cls(
            partitions=rng.choice([1, 2, 3, 4, 6]),
            replicas=rng.choice([1, 1, 2, 2, 3]),
            emails=rng.choice([20, 60, 150]),
            audiences=rng.choice([1, 2, 3]),
            events=rng.choice([150, 400, 900]),
            duration=rng.choice([20.0, 60.0, 120.0]),
            backlog=rng.choice([0.0, 0.5, 0.9]),
            crashes=rng.choice([0, 1, 2, 3]),
            faults=rng.choice([0, 2, 4, 6]),
            max_pending=rng.choice([200, 2000]),
            bulk_min=rng.choice([2, 10]),
        )


@dataclass
class Report:
    seed: int
    profile: Profile
    events: int = 0
    requests: int = 0
    imports: int = 0
    crashes: int = 0
    restarts: int = 0
    rebalances: int = 0
    lost: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    commits: int = 0
    checks: int = 0
    virtual_seconds: float = 0.0
    steps: int = 0
    drained: bool = False


def settings_for(profile: Profile) -> Settings:
    return Settings(
        kafka_bootstrap_servers="sim",
        kafka_topic=TOPIC,
        kafka_group_id=GROUP,
        kafka_dlq_topic=TOPIC + ".dlq",
        kafka_ledger_topic=TOPIC + ".ledger",
        ac_api_url="http://ac.test",
        ac_rate_limit_per_second=5.0,
        ac_concurrency=6,
        ac_request_timeout_seconds=3.0,
        ac_list_sender_url="https://lists.sim.test",
        coalesce_window_seconds=1.0,
        max_pending_changes=profile.max_pending,
        max_tracked_offsets=max(500, profile.max_pending * 3),
        commit_interval_seconds=1.0,
        shutdown_grace_seconds=5.0,
        revoke_deadline_seconds=4.0,
        retry_max_backoff_seconds=8.0,
        retry_give_up_seconds=240.0,
        bulk_min_contacts=profile.bulk_min,
        import_timeout_seconds=90.0,
        import_give_up_seconds=240.0,
        list_verify_seconds=120.0,
        attribute_map={"first_name": "firstName"},
        stale_event_tolerance_seconds=STALE_TOLERANCE_MS / 1000,  # the default, as the model's
    )


class ReplicaClock:
    def __init__(self, world: World, skew: float) -> None:
        self.world, self.skew = world, skew

    def monotonic(self) -> float:
        return self.world.now

    def wall(self) -> float:
        return self.world.now + self.skew

    def sleep(self, seconds: float) -> None:
        self.world.sleep(seconds)


class Replica:
    def __init__(self, sim: Simulation, name: str, skew: float) -> None:
        world = sim.world
        self.sim, self.name = sim, name
        self.clock = ReplicaClock(world, skew)
        self.consumer = sim.cluster.consumer(GROUP, name)
        self.producer = sim.cluster.producer(name)
        s = sim.settings
        self.limiter = SimLimiter(
            world,
            self.clock.wall,
            s.ac_rate_limit_per_second,
            s.ac_rate_guard_seconds,
            s.ac_tools_tick_every,
            sim.network,
        )
        self.executor = SimExecutor(
            world, sim.account, self.limiter, name, s.ac_request_timeout_seconds, sim.network
        )
        rng = random.Random(world.rng.getrandbits(64))
        ports = Ports(
            consumer=self.consumer,
            producer=AckedProducer(self.producer, sleep=world.sleep),
            readers=sim.cluster.readers(),
            scanners=sim.cluster.scanners(),
            executor=self.executor,
            requests=self.limiter,
            decoder=EventDecoder(READER),
            clock=self.clock,
            rng=rng,
            new_id=lambda: f"{name}-{rng.getrandbits(48):012x}",
        )
        self.loop = Loop(s, ports, Metrics(CollectorRegistry()), lambda e: e[:3])
        sim.loops.append(self.loop)
        self.actor: Actor = world.spawn(name, self.loop.run)
        self.limiter.owner = self.executor.owner = self.actor

    def crash(self) -> None:
        self.sim.world.kill(self.actor)
        self.consumer.crash()
        self.producer.crash()
        self.limiter.close()


class Simulation:
    def __init__(self, seed: int, profile: Profile | None = None, *, journal: bool = False) -> None:
        self.seed = seed
        self.world = World(seed)
        rng = self.world.rng
        self.profile = profile or Profile.draw(rng)
        self.settings = settings_for(self.profile)
        self.network = Network()
        self.cluster = SimCluster(self.world)
        self.account = SimAccount(self.world, TOKEN, import_delay=rng.choice([0.5, 3.0]))
        self.account.account.clock = lambda: self.world.now
        self.report = Report(seed, self.profile)
        self.oracle = Oracle()
        self.replicas: dict[str, Replica] = {}
        self.loops: list[Loop] = []
        self.generation = 0
        self.codec = LedgerCodec()
        self.ledger_view: dict[int, dict[str, LedgerEntry]] = {}
        self.parked: set[tuple[int, int]] = set()
        self.last_state: dict[tuple[str, str], Any] = {}
        self.committed: dict[int, int] = {}
        p = self.profile
        for topic in (TOPIC, TOPIC + ".dlq", TOPIC + ".ledger"):
            self.cluster.create(topic, p.partitions)
        self.cluster.on_land = self._landed
        self.cluster.on_commit = self._commit
        self.workload: Workload = make_workload(
            random.Random(rng.getrandbits(64)),
            events=p.events,
            emails=p.emails,
            audiences=p.audiences,
            duration=p.duration,
            backlog=p.backlog,
        )
        self.oracle.excluded = set(self.workload.excluded)
        self.account.account.exclusions |= self.workload.excluded
        from tests.simulation.checks import Checks

        self.checks = Checks(self, journal=journal)

    # ---- observation hooks -----------------------------------------------------------------

    def _landed(self, topic: str, partition: int, offset: int, record: Record) -> None:
        if topic == TOPIC + ".ledger" and record.key is not None:
            key = record.key.decode()
            if "@" in key:
                view = self.ledger_view.setdefault(partition, {})
                if record.value is None:
                    view.pop(key, None)
                else:
                    entry = self.codec.decode(record.value)
                    view[key] = newest(view.get(key), entry)
                    for state in entry.lists:
                        seen = self.last_state.get((key, state.list))
                        self.last_state[(key, state.list)] = state
                        if state != seen and not state.pending and state.status:
                            self.checks.confirmed.setdefault((key, state.list), []).append(
                                self.world.now
                            )
        elif topic == TOPIC + ".dlq":
            headers = dict(record.headers or [])
            source = int(headers["dlq.source.partition"])
            covered = headers.get("dlq.covered_offsets", headers["dlq.source.offset"])
            for offset_text in covered.decode().split(","):
                self.parked.add((source, int(offset_text)))

    def _commit(self, group: str, partition: int, offset: int) -> None:
        previous = self.committed.get(partition, 0)
        if offset < previous:
            raise Violation(
                self.seed, "3 commits", f"partition {partition} went back {previous} -> {offset}"
            )
        self.committed[partition] = offset
        self.report.commits += 1
        self.checks.commit(partition, previous, offset)

    # ---- the history -------------------------------------------------------------------

    def produce(self, event: Any) -> None:
        key = event.email.encode()
        partition = zlib.crc32(key) % self.profile.partitions
        offset = self.cluster.append(
            TOPIC, partition, Record(key, event.encode(), None, int(self.world.now * 1000), "cdp")
        )
        self.oracle.add(partition, offset, event)
        self.report.events += 1

    def start_replica(self) -> Replica:
        self.generation += 1
        name = f"r{self.generation}"
        skew = self.world.uniform(-self.profile.skew, self.profile.skew)
        replica = Replica(self, name, skew)
        self.replicas[name] = replica
        return replica

    def run(self) -> Report:
        from tests.simulation import faults

        world, p = self.world, self.profile
        start = world.now
        for offset, event in self.workload.events:
            world.at(start + offset, lambda e=event: self.produce(e))
        self.checks.people(start)
        for _ in range(p.replicas):
            self.start_replica()
        end_of_faults = faults.schedule(self, start, p.duration)

        def memory() -> None:
            self.checks.memory()
            world.after(2.0, memory)

        world.after(2.0, memory)
        if p.crash_every:
            self._crash_periodically(p.crash_every)
        world.run(until=end_of_faults)
        deadline = world.now + p.drain_limit
        while world.now < deadline and not self.drained():
            world.run(until=min(deadline, world.now + 5.0))
        self.report.drained = self.drained()
        self.report.virtual_seconds = world.now - start
        self.report.steps = world.steps
        self.report.requests = len(self.account.arrivals)
        self.report.imports = sum(1 for a in self.account.arrivals if a.contacts > 1)
        self.checks.final()
        return self.report

    def _crash_periodically(self, every: float) -> None:
        def crash() -> None:
            if self.drained():
                return
            live = [r for r in self.replicas.values() if r.actor.alive]
            if live:
                self.world.rng.choice(live).crash()
                self.report.crashes += 1
                self.world.after(0.5, self.start_replica)
                self.report.restarts += 1
            self.world.after(every, crash)

        self.world.after(every, crash)

    def drained(self) -> bool:
        for partition in range(self.profile.partitions):
            end = len(self.cluster.log(TOPIC, partition))
            if self.committed.get(partition, 0) < end:
                return False
        live = [r for r in self.replicas.values() if r.actor.alive]
        return bool(live) and all(r.loop.idle() for r in live)


def run_history(seed: int, profile: Profile | None = None, *, journal: bool = False) -> Report:
    """One history. ``journal``: keep who each request touched (to explain a failure)."""
    return Simulation(seed, profile, journal=journal).run()

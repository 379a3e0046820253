"""The dry run in the whole loop (simulated cluster and account, virtual time): a preview of a
seeded workload writes nothing anywhere and sends AC only reads, in the tools' ticks; then the
live service runs the same records, and the preview's decision for every (email, list) is
what the live run did (README "Preview"), but for the documented limits: AC's refusals of
writes (excluded emails) and an opt-out an import hides (AC keeps it silently)."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from service.adapters.kafka import AckedProducer
from service.app.preview import Preview, preview_settings
from service.core.budget import TOOLS
from service.core.codec import EventDecoder
from service.core.preview_report import KEEP_OPT_OUT, SKIP, SUBSCRIBE, UNSUBSCRIBE, PreviewReport
from service.metrics import Metrics
from service.pipeline.loop import Loop
from service.pipeline.stages import Ports
from tests.simulation.ac import SimExecutor, SimLimiter
from tests.simulation.harness import GROUP, READER, TOPIC, Profile, ReplicaClock, Simulation
from tests.simulation.model import Event

PREVIEW_GROUP = GROUP + ".preview"


class KeyedReport(PreviewReport):
    """The report, also per key (the simulation's hasher is the identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_key: dict[tuple[str, str], list[str]] = {}

    def add(self, list_label: str, category: str, email_hash: str) -> None:
        super().add(list_label, category, email_hash)
        self.by_key.setdefault((email_hash, list_label), []).append(category)


def _start_preview(sim: Simulation, name: str) -> tuple[Preview, KeyedReport, Any, Loop]:
    world, s = sim.world, sim.settings
    clock = ReplicaClock(world, 0.0)
    limiter = SimLimiter(
        world, clock.wall, s.ac_rate_limit_per_second, s.ac_rate_guard_seconds, 20, sim.network
    )
    limiter.share(frozenset({TOOLS}), 1)  # as wiring does: the ticks kept for tools
    executor = SimExecutor(
        world, sim.account, limiter, name, s.ac_request_timeout_seconds, sim.network
    )
    rng = random.Random(world.rng.getrandbits(64))
    ports = Ports(
        consumer=sim.cluster.consumer(PREVIEW_GROUP, name),
        producer=AckedProducer(sim.cluster.producer(name), sleep=world.sleep),
        readers=sim.cluster.readers(),
        executor=executor,
        requests=limiter,
        decoder=EventDecoder(READER),
        clock=clock,
        rng=rng,
        new_id=lambda: f"preview-{rng.getrandbits(48):012x}",
    )
    preview = Preview(live_group=GROUP)
    report = preview.report = KeyedReport()
    settings = preview_settings(replace(s, preview_group_id=PREVIEW_GROUP))
    loop = Loop(
        settings, preview.ports(ports), Metrics(CollectorRegistry(), dry_run=True), lambda e: e
    )
    preview.attach(loop)
    actor = world.spawn(name, loop.run)
    limiter.owner = executor.owner = actor
    return preview, report, actor, loop


def _apart(sim: Simulation) -> None:
    """The simulation checks every commit against the ledger: the preview's commits (of its
    own group, with no ledger behind them) are not the live service's."""
    live_commit = sim.cluster.on_commit

    def committed(group: str, partition: int, offset: int) -> None:
        if group != PREVIEW_GROUP:
            live_commit(group, partition, offset)

    sim.cluster.on_commit = committed


def _statuses(sim: Simulation) -> dict[tuple[str, str], int]:
    snapshot = sim.account.account.snapshot(sim.world.now)
    return {
        (email, name): status
        for name, data in snapshot["lists"].items()
        for email, status in data["members"].items()
    }


def _preview_round(sim: Simulation, name: str) -> tuple[Preview, KeyedReport]:
    """A dry run from where the live group is; checks that it wrote nothing."""
    world, account = sim.world, sim.account.account
    before, arrivals = account.snapshot(world.now), len(sim.account.arrivals)
    logs = {s: [len(sim.cluster.log(TOPIC + s, p)) for p in range(3)] for s in (".ledger", ".dlq")}
    live = dict(sim.committed)
    group = sim.cluster._group(PREVIEW_GROUP, TOPIC)
    group.committed.clear()
    group.committed.update(live)  # wiring.preview_start: where the live group is
    preview, report, actor, loop = _start_preview(sim, name)
    world.run(until=world.now + 3600, stop=lambda: actor.finished)
    assert actor.finished and actor.error is None, actor.error

    # Nothing written: AC saw reads only, in the tools' ticks; no ledger record, no dead
    # letter, no commit of the live group; the preview's own group is at the end.
    assert account.snapshot(world.now) == before
    sent = sim.account.arrivals[arrivals:]
    assert {a.method for a in sent} <= {"GET"}
    bucket = loop.ports.requests.bucket
    assert bucket.owned == frozenset({TOOLS})  # never took a share of the partitions' ticks
    for arrival in sent:
        tick = round(arrival.at / bucket.interval)  # arrivals a few ms after their tick's start
        assert bucket.owner(tick) == TOOLS or bucket.owner(tick - 1) == TOOLS
    assert logs == {
        s: [len(sim.cluster.log(TOPIC + s, p)) for p in range(3)] for s in (".ledger", ".dlq")
    }
    assert sim.committed == live
    ends = {p: len(sim.cluster.log(TOPIC, p)) for p in range(3)}
    assert {p: o for p, o in group.committed.items() if o} == {p: e for p, e in ends.items() if e}
    return preview, report


def _live_round(sim: Simulation) -> None:
    """The live service on the records the preview read, then stopped (SIGTERM)."""
    world = sim.world
    replica = sim.start_replica()
    deadline = world.now + 900
    while world.now < deadline and not sim.drained():
        world.run(until=world.now + 5)
    sim.report.drained = sim.drained()
    sim.checks.final()  # the live run keeps every invariant after the preview
    replica.loop.request_stop()
    world.run(until=world.now + 60, stop=lambda: not replica.actor.alive)
    assert not replica.actor.alive


def _foretold(
    report: KeyedReport,
    before: dict[tuple[str, str], int],
    after: dict[tuple[str, str], int],
    hidden: set[tuple[str, str]],
    excluded: set[str],
) -> None:
    """Every key's preview decision against what the live run then did to AC. ``hidden``:
    keys whose opt-out an import hides (AC keeps it, nobody reads it)."""
    for key, categories in report.by_key.items():
        assert len(categories) == 1, (key, categories)  # one change per key: one backlog
        category, was, now = categories[0], before.get(key), after.get(key)
        if category == SUBSCRIBE:
            assert now == 1 or key[0] in excluded or key in hidden, (key, was, now)
        elif category == UNSUBSCRIBE:
            assert was == 1 and now == 2, (key, was, now)
        elif category == KEEP_OPT_OUT:
            assert was == now == 2, (key, was, now)
        else:
            assert category == SKIP and was == now, (key, category, was, now)


def _event(email: str, audience: str, action: str, n: int) -> Event:
    return Event(email, audience, action, 1_800_000_000_000 + n, {}, f"round2-{n}")


@pytest.mark.parametrize("seed", range(6))
def test_a_preview_writes_nothing_and_foretells_the_live_run(seed: int) -> None:
    profile = Profile(
        partitions=3, replicas=1, emails=60, audiences=2, events=400, backlog=1.0, crashes=0
    )
    sim = Simulation(1000 + seed, profile)
    world, account = sim.world, sim.account.account
    sim.workload.opt_out_times = []  # opt-outs made between the rounds, by this test
    sim.checks.people(world.now)
    for _, event in sim.workload.events:
        sim.produce(event)
    _apart(sim)
    excluded = sim.workload.excluded
    opted_out = set(sim.workload.opted_out_before)

    # Round 1: the first deployment (no ledger), a backlog: imports.
    preview, report = _preview_round(sim, "preview-1")
    last = sim.oracle.last_events()
    assert set(report.by_key) == set(last)
    poison = sum(1 for _, e in sim.workload.events if e.kind != "valid")
    assert sum(report.records_parked.values()) == poison
    assert preview.kafka.produced[TOPIC + ".dlq"] == poison
    before = _statuses(sim)
    _live_round(sim)
    _foretold(report, before, _statuses(sim), opted_out, excluded)

    # Round 2, with a ledger: exits of subscriptions (some after the person opted out in AC),
    # entries of people who opted out before, of people who left, re-entries.
    rng = random.Random(seed)
    statuses = _statuses(sim)
    subscribed = sorted(k for k, s in statuses.items() if s == 1)
    gone = sorted(k for k, e in last.items() if e.action == "EXITED" and k not in statuses)
    mine = rng.sample(subscribed, 8)
    for email, audience in mine[:3]:
        account.self_unsubscribe(email, audience)
        sim.oracle.opted_out.setdefault((email, audience), world.now)
    changes = [(k, "EXITED") for k in mine[:2] + mine[3:]] + [(mine[2], "ENTERED")]
    changes += [(k, "ENTERED") for k in sorted(opted_out) + rng.sample(gone, min(3, len(gone)))]
    for n, ((email, audience), action) in enumerate(changes):
        sim.produce(_event(email, audience, action, n))
    preview, report = _preview_round(sim, "preview-2")
    assert len(report.by_key) == len(set(k for k, _ in changes))
    before = _statuses(sim)
    _live_round(sim)
    _foretold(report, before, _statuses(sim), set(), excluded)
    seen = {c for categories in report.by_key.values() for c in categories}
    assert {UNSUBSCRIBE, SKIP} <= seen
    print(seed, sorted(seen))


def test_a_preview_of_a_busy_topic_ends_at_the_end_it_first_read() -> None:
    """Records keep arriving faster than the coalescing window: the preview still ends, with
    the records up to where it first reached the end of each partition."""
    sim = Simulation(7, Profile(partitions=3, replicas=1, events=0, crashes=0, faults=0))
    world = sim.world
    _apart(sim)
    for n in range(60):
        sim.produce(_event(f"b{n}@example.com", "Audience A", "ENTERED", n))
    for n in range(60, 60 + 4000):  # one every 0.3 s for 20 minutes
        world.at(
            world.now + (n - 59) * 0.3,
            lambda n=n: sim.produce(_event(f"b{n}@example.com", "Audience A", "ENTERED", n)),
        )
    preview, report, actor, _ = _start_preview(sim, "busy")
    world.run(until=world.now + 600, stop=lambda: actor.finished)
    assert actor.finished and actor.error is None, actor.error
    read = preview.watch.records if preview.watch else 0
    assert 60 <= read < sim.report.events
    assert sum(e.counts[SUBSCRIBE] for e in report.lists.values()) == read

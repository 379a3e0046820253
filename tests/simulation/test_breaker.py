"""The dead-letter breaker in the whole loop (simulated cluster and account, virtual time): a
producer that starts sending garbage stops its partition after a bounded number of dead
letters, readiness says so, nothing after the trip is committed or lost, and a restart
resumes it (README "Dead-letter breaker")."""

from __future__ import annotations

import uuid
from dataclasses import replace

from service.pipeline.source import POISON
from tests.simulation.harness import Profile, Simulation
from tests.simulation.model import Event

VALID_BEFORE, GARBAGE, VALID_AFTER = 20, 60, 20
WINDOW = 50  # more than 25 poison within 50 offsets trips


def _scenario(max_share: float, kinds: list[str] | None = None) -> Simulation:
    profile = Profile(partitions=1, replicas=1, events=0, crashes=0, faults=0)
    sim = Simulation(5, profile)
    sim.settings = replace(sim.settings, dlq_breaker_window=WINDOW, dlq_breaker_max_share=max_share)
    if kinds is None:
        kinds = ["valid"] * VALID_BEFORE + ["garbage"] * GARBAGE + ["valid"] * VALID_AFTER
    for n, kind in enumerate(kinds):
        sim.produce(
            Event(
                f"p{n}@example.com",
                "Audience A",
                "ENTERED",
                1_700_000_000_000 + n,
                {},
                str(uuid.UUID(int=n)),
                kind,
            )
        )
    return sim


def _run(sim: Simulation, seconds: float) -> None:
    sim.world.run(until=sim.world.now + seconds)


def _stop(sim: Simulation) -> None:
    for replica in sim.replicas.values():
        if replica.actor.alive:
            replica.loop.request_stop()
    _run(sim, 30)
    assert not any(r.actor.alive for r in sim.replicas.values())


def test_a_run_of_garbage_stops_the_partition_and_a_restart_resumes_it() -> None:
    sim = _scenario(0.5)
    first = sim.start_replica()
    _run(sim, 60)
    # The 26th poison record within 50 offsets tripped it: offsets 20..45 parked, nothing
    # after them read into the pipeline, everything before them committed.
    trip = VALID_BEFORE + WINDOW // 2
    assert sim.parked == {(0, o) for o in range(VALID_BEFORE, trip + 1)}
    assert sim.committed[0] == trip + 1
    ready, detail = first.loop.readiness()
    assert ready and detail["dlq_breaker_open_partitions"] == [0]
    assert first.loop.pauses.held(POISON) == {0}
    assert first.consumer.paused == {0}
    registry = first.loop.metrics.registry
    assert registry.get_sample_value("ac_sync_dlq_breaker_open_partitions") == 1.0
    _run(sim, 120)  # it stays stopped: no more dead letters, no commit beyond the trip
    assert sim.committed[0] == trip + 1 and len(sim.parked) == trip + 1 - VALID_BEFORE
    _stop(sim)
    assert sim.committed[0] == trip + 1  # the held records were never tracked nor committed

    # A restart starts with an empty window: the next 26 poison records trip it again.
    second = sim.start_replica()
    _run(sim, 60)
    again = trip + 1 + WINDOW // 2
    assert sim.committed[0] == again + 1
    assert second.loop.readiness()[1]["dlq_breaker_open_partitions"] == [0]
    _stop(sim)

    # Past a long bad stretch: the breaker turned off (DLQ_BREAKER_MAX_SHARE=1) for one life.
    sim.settings = replace(sim.settings, dlq_breaker_max_share=1.0)
    third = sim.start_replica()
    _run(sim, 120)
    end = VALID_BEFORE + GARBAGE + VALID_AFTER
    assert sim.committed[0] == end
    assert sim.parked == {(0, o) for o in range(VALID_BEFORE, VALID_BEFORE + GARBAGE)}
    assert third.loop.readiness()[1]["dlq_breaker_open_partitions"] == []
    assert third.loop.metrics.registry.get_sample_value("ac_sync_dlq_breaker_open_partitions") == 0
    members = sim.account.account.snapshot(sim.world.now)["lists"]["Audience A"]["members"]
    assert len(members) == VALID_BEFORE + VALID_AFTER  # nothing valid was lost


def test_poison_up_to_the_share_keeps_flowing() -> None:
    """Every other record garbage: half of any 50 offsets, never more. All of it is parked
    and the partition is never stopped."""
    sim = _scenario(0.5, ["valid", "garbage"] * 100)
    replica = sim.start_replica()
    _run(sim, 120)
    assert sim.committed[0] == 200
    assert sim.parked == {(0, o) for o in range(1, 200, 2)}
    assert replica.loop.readiness()[1]["dlq_breaker_open_partitions"] == []


def test_a_replica_on_an_empty_topic_is_ready_once_assigned_and_restored() -> None:
    """Readiness asks whether the broker answers, not whether records flow: a replica whose
    partitions hold nothing (a new audience topic, a quiet night) is ready. Found by the
    broker-outage integration test: the pod never became ready on an empty topic."""
    sim = _scenario(0.5, kinds=[])
    replica = sim.start_replica()
    _run(sim, 30)
    ready, detail = replica.loop.readiness()
    assert detail["assigned_partitions"] == 1 and detail["ledger_restoring_partitions"] == 0
    assert detail["broker_connected"] is True
    assert ready
    _stop(sim)

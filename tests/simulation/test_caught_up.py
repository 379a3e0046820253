"""A backlog published long ago is sent as soon as it is all read, in the whole loop (simulated
cluster and account, virtual time): a consumer that had kept up would have sent it a window
after publication, long over. The defect behind it was found by the integration test of the
same promise (tests/integration/test_pipeline.py): a backlog read in the consume that assigned
the partitions was held while the ledger restored, its partitions' end was reported meanwhile
(librdkafka says it once), and every change then waited a whole window after it was read. Here
the simulated restore is quicker than the first fetch, so this test states the promise in the
whole loop; the held-then-ended path is the integration test's."""

from __future__ import annotations

import uuid
from dataclasses import replace

from tests.simulation.harness import Profile, Simulation
from tests.simulation.model import Event

WINDOW = 30.0


def test_a_backlog_published_long_ago_leaves_once_read_not_a_window_later() -> None:
    profile = Profile(partitions=2, replicas=1, events=0, crashes=0, faults=0)
    sim = Simulation(11, profile)
    sim.settings = replace(sim.settings, coalesce_window_seconds=WINDOW)
    t0 = sim.world.now
    for n in range(40):
        sim.produce(
            Event(
                f"p{n}@example.com",
                "Audience A",
                "ENTERED",
                1_700_000_000_000 + n,
                {},
                str(uuid.UUID(int=n)),
                "valid",
            )
        )
    sim.world.at(t0 + 600.0, lambda: None)  # published ten minutes before the replica starts
    sim.world.run(until=t0 + 600.0)
    assert sim.world.now == t0 + 600.0
    started = sim.world.now
    replica = sim.start_replica()
    sim.world.run(until=started + WINDOW + 30)
    writes = [
        a.at - started
        for a in sim.account.arrivals
        if a.method == "POST" and a.path.endswith(("/import/bulk_import", "/contact/sync"))
    ]
    assert writes, "nothing was sent"
    assert min(writes) < WINDOW / 2, f"first write {min(writes):.1f}s after start"
    replica.loop.request_stop()
    sim.world.run(until=sim.world.now + 30)

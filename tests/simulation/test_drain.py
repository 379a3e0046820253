"""What a drain costs at its edges, in the whole loop (simulated cluster and account, virtual
time): how full its imports leave, how soon its last offsets are committed, and how soon a
SIGTERM after it returns. Each was a fixed cost of the end-to-end benchmark
(``benchmarks/RESULTS.md``): partly filled imports (93 where 76 carried the same contacts),
commits held to the busy schedule while contact ids were still being learned, and a shutdown
that waited out its whole grace for those background reads."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from typing import Any

from service.pipeline.dispatch import LearnTask
from tests.simulation.harness import TOPIC, Profile, Replica, Simulation
from tests.simulation.model import Event


def _entry(n: int) -> Event:
    return Event(
        f"drain{n}@example.com",
        "Audience A",
        "ENTERED",
        1_700_000_000_000 + n,
        {},
        str(uuid.UUID(int=n)),
        "valid",
    )


def _produce_over(sim: Simulation, count: int, seconds: float) -> float:
    """``count`` first entries of distinct emails, published evenly over ``seconds``."""
    t0 = sim.world.now
    for n in range(count):
        sim.world.at(t0 + n * seconds / count, lambda n=n: sim.produce(_entry(n)))
    return t0


def _imports(sim: Simulation) -> list[int]:
    return [
        a.contacts
        for a in sim.account.arrivals
        if a.method == "POST" and a.path.endswith("/import/bulk_import")
    ]


def _committed(sim: Simulation) -> bool:
    return all(
        sim.committed.get(p, 0) >= len(sim.cluster.log(TOPIC, p))
        for p in range(sim.profile.partitions)
    )


def _drain(sim: Simulation, after: float, limit: float) -> float:
    """Run until everything produced before ``after`` is committed; return when it was."""
    sim.world.at(after, lambda: None)
    sim.world.run(until=after)
    deadline = sim.world.now + limit
    while not _committed(sim) and sim.world.now < deadline:
        sim.world.at(sim.world.now + 0.1, lambda: None)
        sim.world.run(until=sim.world.now + 0.1)
    assert _committed(sim), "not drained"
    return sim.world.now


def _simulation(seed: int, **settings: Any) -> tuple[Simulation, Replica]:
    sim = Simulation(seed, Profile(partitions=2, replicas=1, events=0, crashes=0, faults=0))
    # The service's defaults for what this measures: the busy commit schedule and the grace.
    sim.settings = replace(
        sim.settings,
        commit_interval_seconds=5.0,
        shutdown_grace_seconds=20.0,
        bulk_min_contacts=10,
        **settings,
    )
    return sim, sim.start_replica()


def test_changes_that_fall_due_over_a_few_seconds_leave_in_full_imports() -> None:
    sim, _ = _simulation(21)
    contacts = 600  # falling due over 1.5 s, one window after they are read
    t0 = _produce_over(sim, contacts, 1.5)
    _drain(sim, t0 + 1.5, 120.0)
    sizes = _imports(sim)
    assert sum(sizes) == contacts
    assert len(sizes) == math.ceil(contacts / 250), f"imports of {sizes} contacts"


def test_a_drain_commits_and_a_sigterm_returns_while_ids_are_still_being_learned() -> None:
    sim, replica = _simulation(22)
    contacts = 6_000  # 24 imports: 60 background reads of 100 ids to learn after them
    t0 = _produce_over(sim, contacts, 0.5)

    def learning() -> bool:
        importing = replica.loop.delivery.importing
        in_flight = any(replica.loop.dispatcher.tasks(LearnTask))
        return in_flight or any(batch.ids for batch in importing.learning.to_learn)

    drained = _drain(sim, t0 + 0.5, 180.0)
    last_poll = max(a.at for a in sim.account.arrivals if a.path.endswith("/import/info"))
    assert learning(), "nothing left to learn: the test would prove nothing"
    # Idle but for learning: the idle schedule (0.5 s), not the busy one (5 s), commits.
    assert drained - last_poll < 2.0, f"committed {drained - last_poll:.1f}s after the last poll"
    stopped_at = sim.world.now
    replica.loop.request_stop()
    while replica.actor.alive and sim.world.now < stopped_at + 30.0:
        sim.world.at(sim.world.now + 0.1, lambda: None)
        sim.world.run(until=sim.world.now + 0.1)
    assert not replica.actor.alive
    assert replica.actor.error is None, replica.actor.error
    took = sim.world.now - stopped_at
    assert took < 2.0, f"the shutdown took {took:.1f}s of its 20 s grace"


def test_a_trickle_of_new_people_is_sent_as_it_falls_due_two_requests_each() -> None:
    """A lone change goes per contact as soon as it is due: with fewer changes anywhere than an
    import's minimum, nothing can gather, so no gathering pause (two of them, 0.2 s each, were
    the largest part of the trickle benchmark's 1.3 s beyond the window). And a contact that
    ``contact/sync`` just created (201) is on no list: its lists are not read first."""
    sim, _ = _simulation(23)
    window = sim.settings.coalesce_window_seconds
    t0 = sim.world.now + 1.0
    people = 12
    for n in range(people):
        sim.world.at(t0 + 1.5 * n, lambda n=n: sim.produce(_entry(n)))
    _drain(sim, t0 + 1.5 * people, 60.0)
    syncs = [a for a in sim.account.arrivals if a.path.endswith("/contact/sync")]
    writes = [a for a in sim.account.arrivals if a.path.endswith("/contactLists")]
    reads = [a for a in sim.account.arrivals if "/contactLists" in a.path and a.method == "GET"]
    assert (len(syncs), len(writes), len(reads)) == (people, people, 0)
    interval = sim.settings.ac_rate_guard_seconds + 1 / sim.settings.ac_rate_limit_per_second
    late = [round(a.at - (t0 + 1.5 * n) - window, 3) for n, a in enumerate(syncs)]
    # Read up to 0.25 s after it was published (the idle loop's consume wait), due a window
    # later; then the write-ahead to the ledger and at most a request slot (plus the tools'
    # slot it may fall on). Before: 0.69-0.90 s, the two pauses included.
    bound = 0.25 + 2 * interval
    assert max(late) < bound, f"sent this long after a window: {late}"


def test_the_polls_of_a_burst_of_imports_are_not_held_back_until_the_burst_ends() -> None:
    """An import is confirmed by its ``import/info`` poll. Imports took every worker while a
    minute's burst lasted, so the polls (and the commit) waited for its end: the 500,000-event
    drain's last 64 polls came in a row after its last import, 16 s. Polls now share the
    urgent lane, and imports leave them half the workers."""
    # The service's pending bound: the whole backlog is read at once (the simulation's small
    # bound would pause it between groups of imports, hiding the burst).
    sim, _ = _simulation(24, max_pending_changes=100_000)
    contacts = 30 * 250
    t0 = _produce_over(sim, contacts, 0.5)
    _drain(sim, t0 + 0.5, 300.0)
    imports = [a.at for a in sim.account.arrivals if a.path.endswith("/import/bulk_import")]
    polls = [a.at for a in sim.account.arrivals if a.path.endswith("/import/info")]
    assert len(imports) == 30, len(imports)
    # The first poll is due 2 s (the expected processing time) after the first import; it
    # waited for 23 more imports before (6.2 s).
    first = polls[0] - imports[0]
    assert first < 4.0, f"the first poll came {first:.1f}s after the first import"


def test_ids_are_not_learned_in_the_gaps_of_a_drain_under_a_minute() -> None:
    """A burst's drain is its requests: the 100,000-event benchmark's 11 reads of ids, taken in
    gaps between its imports and polls, each moved the last confirmation a slot later. Learning
    waits while imports are on their way, for up to a minute."""
    sim, _ = _simulation(25, max_pending_changes=100_000)
    t0 = _produce_over(sim, 30 * 250, 0.5)
    _drain(sim, t0 + 0.5, 300.0)
    polls = [a.at for a in sim.account.arrivals if a.path.endswith("/import/info")]
    reads = [a.at for a in sim.account.arrivals if a.method == "GET" and "/contacts" in a.path]
    assert polls[-1] - t0 < 60.0  # the drain took less than a minute
    early = [round(t - t0, 1) for t in reads if t < polls[-1]]
    assert not early, f"ids read during the drain at {early}"


def test_ids_are_learned_during_a_drain_longer_than_a_minute_after_a_minute() -> None:
    """Not at all during a long drain would leave every exit of its contacts to a read by email
    (one request each) for as long as a steady stream keeps imports on their way."""
    sim, _ = _simulation(26, max_pending_changes=100_000)
    t0 = _produce_over(sim, 200 * 250, 0.5)  # imports for more than two minutes
    _drain(sim, t0 + 0.5, 600.0)
    polls = [a.at for a in sim.account.arrivals if a.path.endswith("/import/info")]
    reads = [a.at for a in sim.account.arrivals if a.method == "GET" and "/contacts" in a.path]
    during = [t for t in reads if t < polls[-1]]
    assert during, "no id learned during the drain"
    assert min(during) - polls[0] >= 55.0, round(min(during) - polls[0], 1)


def test_no_id_is_read_between_a_drains_last_import_and_its_last_poll() -> None:
    """Past the minute, learning still yields to a poll in flight or due within 2 s: the
    500,000-event load's last 6 s held 9 reads of ids between its last polls, each a slot the
    drain's last confirmation waited for."""
    sim, _ = _simulation(27, max_pending_changes=100_000)
    t0 = _produce_over(sim, 110 * 250, 0.5)  # a second minute of imports, after learning began
    _drain(sim, t0 + 0.5, 600.0)
    imports = [
        a.at
        for a in sim.account.arrivals
        if a.method == "POST" and a.path.endswith("/import/bulk_import")
    ]
    polls = [a.at for a in sim.account.arrivals if a.path.endswith("/import/info")]
    reads = [a.at for a in sim.account.arrivals if a.method == "GET" and "/contacts" in a.path]
    assert imports[-1] - t0 > 60.0  # learning was due during the second minute's imports
    tail = [round(t - t0, 1) for t in reads if imports[-1] <= t <= polls[-1]]
    assert not tail, f"ids read at {tail}, before the last poll at {polls[-1] - t0:.1f}"

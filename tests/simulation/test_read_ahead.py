"""A backlog read ahead (``pipeline/ahead.py``), in the whole loop: a first load larger than the
pending bound sends AC only each (email, list)'s final state.

Without the read-ahead the backlog goes out in waves of the pending bound: a person entered in
one wave and exited in a later one costs an import, a read of AC (an import's subscription is
not verified) and an unsubscribe. The same backlog is run both ways: the figures with the
read-ahead off show what the test would catch."""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import replace

from tests.simulation.harness import TOPIC, Profile, Simulation
from tests.simulation.model import Event

PEOPLE = 400


def _event(n: int, person: int, audience: str, action: str) -> Event:
    return Event(
        f"ahead{person}@example.com",
        audience,
        action,
        1_700_000_000_000 + n,
        {},
        str(uuid.UUID(int=n + 1)),
        "valid",
    )


def _backlog(sim: Simulation) -> dict[str, set[str]]:
    """Every person enters A; later in the log half of them exit A, and every third enters B
    twice. Returns the final members per list."""
    events: list[tuple[int, str, str]] = [(p, "Audience A", "ENTERED") for p in range(PEOPLE)]
    events += [(p, "Audience B", "ENTERED") for p in range(0, PEOPLE, 3)]
    events += [(p, "Audience A", "EXITED") for p in range(0, PEOPLE, 2)]
    events += [(p, "Audience B", "ENTERED") for p in range(0, PEOPLE, 3)]
    for n, (person, audience, action) in enumerate(events):
        sim.produce(_event(n, person, audience, action))
    return {
        "Audience A": {f"ahead{p}@example.com" for p in range(1, PEOPLE, 2)},
        "Audience B": {f"ahead{p}@example.com" for p in range(0, PEOPLE, 3)},
    }


def _run(seed: int, read_ahead_keys: int) -> tuple[dict[str, dict[str, int]], Counter[str], int]:
    """The backlog drained by one replica: AC's lists (email -> status), its requests, and how
    many contacts its imports carried."""
    sim = Simulation(seed, Profile(partitions=3, replicas=0, events=0, crashes=0, faults=0))
    # A pending bound of a seventh of the backlog: the waves a first load larger than the bound
    # is sent in without the read-ahead.
    sim.settings = replace(
        sim.settings, max_pending_changes=120, read_ahead_max_keys=read_ahead_keys
    )
    final = _backlog(sim)
    sim.start_replica()
    limit = sim.world.now + 600.0
    while sim.world.now < limit and not all(
        sim.committed.get(p, 0) >= len(sim.cluster.log(TOPIC, p)) for p in range(3)
    ):
        sim.world.at(sim.world.now + 0.5, lambda: None)
        sim.world.run(until=sim.world.now + 0.5)
    assert all(sim.committed.get(p, 0) >= len(sim.cluster.log(TOPIC, p)) for p in range(3))
    snapshot = sim.account.account.snapshot(sim.world.now)
    lists = {name: dict(data["members"]) for name, data in snapshot["lists"].items()}
    assert {n: {e for e, s in m.items() if s == 1} for n, m in lists.items()} == final
    by_kind: Counter[str] = Counter()
    for arrival in sim.account.arrivals:
        path = arrival.path.split("?")[0].removeprefix("/api/3")
        if path.startswith(("/contacts/", "/lists/")):
            path = "/" + path.split("/")[1] + "/{id}" + "/".join(["", *path.split("/")[3:]])
        by_kind[f"{arrival.method} {path}"] += 1
    imported = sum(
        a.contacts for a in sim.account.arrivals if a.path.endswith("/import/bulk_import")
    )
    return lists, by_kind, imported


def test_a_backlog_larger_than_the_pending_bound_sends_only_final_states() -> None:
    lists, requests, imported = _run(31, 500_000)
    # Nobody who exits later in the backlog was ever subscribed: AC never held a status 2.
    unsubscribed = {n: {e for e, s in m.items() if s != 1} for n, m in lists.items()}
    assert unsubscribed == {"Audience A": set(), "Audience B": set()}, requests
    # Imports of final entries, their polls, the lists, the learning of the imported contacts'
    # ids. No exit read, no per-contact write.
    assert set(requests) == {
        "GET /lists",
        "POST /lists",
        "POST /import/bulk_import",
        "GET /import/info",
        "GET /contacts",
    }, requests
    # The same backlog without the read-ahead: the waves. People entered in one wave are read
    # and unsubscribed in the next; more rows imported, more requests.
    lists_without, requests_without, imported_without = _run(31, 0)
    assert {e for e, s in lists_without["Audience A"].items() if s == 2}, requests_without
    assert imported < imported_without, (imported, imported_without)
    assert sum(requests.values()) < sum(requests_without.values()), (requests, requests_without)


def _rows_per_email(sim: Simulation) -> Counter[str]:
    """How many import rows carried each email."""
    rows: Counter[str] = Counter()
    for batch in sim.account.account.imports.values():
        rows.update(str(contact["email"]).strip().lower() for contact in batch.contacts)
    return rows


def _drain(sim: Simulation, partitions: int) -> None:
    sim.start_replica()
    limit = sim.world.now + 600.0
    while sim.world.now < limit and not all(
        sim.committed.get(p, 0) >= len(sim.cluster.log(TOPIC, p)) for p in range(partitions)
    ):
        sim.world.at(sim.world.now + 0.5, lambda: None)
        sim.world.run(until=sim.world.now + 0.5)
    assert all(sim.committed.get(p, 0) >= len(sim.cluster.log(TOPIC, p)) for p in range(partitions))


def _members(sim: Simulation) -> dict[str, set[str]]:
    snapshot = sim.account.account.snapshot(sim.world.now)
    return {
        name: {e for e, s in data["members"].items() if s == 1}
        for name, data in snapshot["lists"].items()
    }


def test_an_emails_lists_leave_in_one_row_when_the_pending_bound_falls_between_its_records() -> (
    None
):
    """Each person enters A, and B 20 people later in the log. With a pending bound of 120
    changes (of 800) a pause for the bound falls between some people's two records: their A
    waits for their B (``Coalescer.add(hold=True)``) instead of leaving in the wave before."""
    sim = Simulation(37, Profile(partitions=3, replicas=0, events=0, crashes=0, faults=0))
    sim.settings = replace(sim.settings, max_pending_changes=120, read_ahead_max_keys=500_000)
    order = sorted(
        [(2 * p, p, "Audience A") for p in range(PEOPLE)]
        + [(2 * (p + 20) + 1, p, "Audience B") for p in range(PEOPLE)]
    )
    for n, (_, person, audience) in enumerate(order):
        sim.produce(_event(n, person, audience, "ENTERED"))
    _drain(sim, 3)
    everyone = {f"ahead{p}@example.com" for p in range(PEOPLE)}
    assert _members(sim) == {"Audience A": everyone, "Audience B": everyone}
    rows = _rows_per_email(sim)
    assert len(rows) >= PEOPLE * 0.9, len(rows)  # the rest went per contact (fewer than an import)
    assert max(rows.values()) == 1, sorted(e for e, n in rows.items() if n > 1)


def test_holds_that_fill_the_pending_bound_are_released_and_the_backlog_drains() -> None:
    """Every person enters A, then every person enters B: with a bound of 120 changes every A
    held for its B would fill it, and no B could be read while paused. The holds go once the
    bound pauses the partitions with nothing else to send, and the backlog drains."""
    people = 2000  # more than a consumed batch: the bound pauses the partitions between them
    sim = Simulation(41, Profile(partitions=3, replicas=0, events=0, crashes=0, faults=0))
    sim.settings = replace(sim.settings, max_pending_changes=120, read_ahead_max_keys=500_000)
    for n, (person, audience) in enumerate(
        [(p, "Audience A") for p in range(people)] + [(p, "Audience B") for p in range(people)]
    ):
        sim.produce(_event(n, person, audience, "ENTERED"))
    _drain(sim, 3)
    everyone = {f"ahead{p}@example.com" for p in range(people)}
    assert _members(sim) == {"Audience A": everyone, "Audience B": everyone}

"""What the CDP sends and what AC must hold at the end: the workload and the oracle.

The workload is drawn from the seed: emails (a few hot ones), audiences, entries, exits and
re-entries, attribute changes, invalid records (bad emails, undecodable bytes), emails AC
excludes, and people who opt out in AC themselves at random moments (before their first entry,
between entry and exit, between exit and re-entry).

The oracle (Jepsen-style, the whole history against a model): for every (email, audience) the
last event in partition order wins, except that a person's own opt-out is never overridden: once
a person opted out while subscribed, the list must not show them subscribed again. The one
unknowable case (the person opts out between the service's check of an exit and its unsubscribe)
is detected from AC's arrival log and exempted, as the README says.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from service.core.codec import encode_event, load_reader_schema

SCHEMA = load_reader_schema()
STALE_TOLERANCE_MS = 60_000  # the service's default STALE_EVENT_TOLERANCE_SECONDS


@dataclass
class Event:
    email: str
    audience: str
    action: str  # ENTERED / EXITED
    occurred_ms: int
    attributes: dict[str, str]
    event_id: str
    kind: str = "valid"  # valid / invalid_email / garbage
    late: bool = False  # a copy of an older event sent again (a redrive, a late re-send)

    def encode(self) -> bytes:
        if self.kind == "garbage":
            return b"\x07not avro at all"
        return encode_event(
            {
                "event_id": self.event_id,
                "occurred_at": self.occurred_ms,
                "email": self.email,
                "audience_id": "aud-" + self.audience,
                "audience_name": self.audience,
                "campaign_id": None,
                "treatment_group": None,
                "action": self.action,
                "attributes": self.attributes,
            },
            SCHEMA,
        )


@dataclass
class Workload:
    events: list[tuple[float, Event]]  # (virtual time offset, event), sorted
    emails: list[str]
    audiences: list[str]
    excluded: set[str]
    opted_out_before: list[tuple[str, str]]  # (email, audience): opted out before we start
    opt_out_times: list[float]  # when a random subscribed person opts out


def make_workload(
    rng: random.Random,
    *,
    events: int,
    emails: int,
    audiences: int,
    duration: float,
    backlog: float,
    poison: float = 0.01,
    late: float = 0.01,
) -> Workload:
    pool = [f"p{i}.{rng.randrange(10**6)}@example.com" for i in range(emails)]
    hot = pool[: max(1, emails // 10)]
    names = [f"Audience {chr(65 + i)}" for i in range(audiences)]
    state: dict[tuple[str, str], str] = {}
    out: list[tuple[float, Event]] = []
    start_ms = 1_700_000_000_000
    for n in range(events):
        at = 0.0 if rng.random() < backlog else rng.uniform(0.0, duration)
        email = rng.choice(hot) if rng.random() < 0.3 else rng.choice(pool)
        audience = rng.choice(names)
        current = state.get((email, audience))
        if current is None:
            action = "ENTERED" if rng.random() < 0.85 else "EXITED"
        else:
            action = "EXITED" if current == "ENTERED" and rng.random() < 0.6 else "ENTERED"
        state[(email, audience)] = action
        attributes = {"first_name": rng.choice(["Ann", "Bo", "Cy"])} if rng.random() < 0.3 else {}
        event = Event(
            email,
            audience,
            action,
            start_ms + n,
            attributes,
            str(uuid.UUID(int=rng.getrandbits(128))),
        )
        roll = rng.random()
        if roll < poison / 2:
            event.kind, event.email = "invalid_email", f"not-an-email-{n}"
        elif roll < poison:
            event.kind = "garbage"
        out.append((at, event))
    out.sort(key=lambda item: item[0])
    # Event times follow production order (one producer's clock), a second apart.
    for index, (_, event) in enumerate(out):
        event.occurred_ms = start_ms + index * 1000
    out = _with_late_copies(rng, out, late)
    excluded = set(rng.sample(pool, k=min(len(pool), max(0, emails // 50))))
    # People who opted out before the service started (their contact exists in AC). Not among
    # excluded emails: AC refuses to create those, so none of them has a contact to keep.
    allowed = [e for e in pool if e not in excluded]
    before = [(rng.choice(allowed), rng.choice(names)) for _ in range(max(1, emails // 25))]
    opt_outs = sorted(rng.uniform(0.0, duration * 1.5) for _ in range(max(1, emails // 20)))
    return Workload(out, pool, names, excluded, before, opt_outs)


def _with_late_copies(
    rng: random.Random, events: list[tuple[float, Event]], late: float
) -> list[tuple[float, Event]]:
    """Now and then, after an event (at once, or up to 20 s later), the same record of an older
    event of that email and list again: older than the newest by more than twice the staleness
    tolerance, so the service's guard must skip it (the oracle ignores it)."""
    result: list[tuple[float, Event]] = []
    history: dict[tuple[str, str], list[Event]] = {}
    for at, event in events:
        result.append((at, event))
        if event.kind != "valid":
            continue
        key = (event.email, event.audience)
        seen = history.setdefault(key, [])
        old = [e for e in seen if event.occurred_ms - e.occurred_ms > 2 * STALE_TOLERANCE_MS]
        if old and rng.random() < late:
            copy = rng.choice(old)
            again = at + rng.choice([0.0, rng.uniform(0.0, 20.0)])  # at once, or a while later
            result.append((again, replace(copy, attributes=dict(copy.attributes), late=True)))
        seen.append(event)
    result.sort(key=lambda item: item[0])
    return result


@dataclass
class Oracle:
    """The source records as produced (per partition, in offset order) and the opt-outs."""

    records: dict[int, list[Event]] = field(default_factory=dict)
    opted_out: dict[tuple[str, str], float] = field(default_factory=dict)  # first effective one
    exempt: set[tuple[str, str]] = field(default_factory=set)  # the unknowable race
    excluded: set[str] = field(default_factory=set)
    keys: list[tuple[str, str]] = field(default_factory=list)  # (email, audience), first seen
    _seen: set[tuple[str, str]] = field(default_factory=set)

    def add(self, partition: int, offset: int, event: Event) -> None:
        records = self.records.setdefault(partition, [])
        assert offset == len(records), "records land in offset order"
        records.append(event)
        key = (event.email, event.audience)
        if event.kind == "valid" and key not in self._seen:
            self._seen.add(key)
            self.keys.append(key)

    def last_events(self) -> dict[tuple[str, str], Event]:
        last: dict[tuple[str, str], Event] = {}
        for records in self.records.values():
            for event in records:
                if event.kind == "valid" and not event.late:
                    last[(event.email, event.audience)] = event
        return last

    def expected(self) -> dict[tuple[str, str], bool]:
        """(email, audience) -> subscribed at the end."""
        result: dict[tuple[str, str], bool] = {}
        for key, event in self.last_events().items():
            if key in self.exempt:
                continue
            email, _ = key
            subscribed = event.action == "ENTERED"
            if key in self.opted_out or email in self.excluded:
                subscribed = False
            result[key] = subscribed
        return result


def summary(value: Any) -> str:
    return repr(value)[:400]

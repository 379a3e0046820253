"""Sample audience events with their oracle (the exact final state AC must end in).

Used by the demo, the end-to-end tests and the benchmark. Deterministic for a seed. Events mix
upper/lower-case spellings of one email (they must coalesce to one contact) and, when asked,
invalid emails (they must land in the DLQ).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Producer

from service.core.codec import encode_event, load_reader_schema
from service.core.model import normalise_email


@dataclass
class SampleSet:
    records: list[tuple[bytes, bytes]]  # (key, value)
    expected: dict[str, dict[str, int]]  # list name -> email -> status
    invalid: int
    event_ids: list[str] = field(default_factory=list)


def subscribed(lists: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    """List name -> subscribed emails, lists without any left out: the state the sync promises.
    "Unsubscribed" and "not on the list" are the same promise: the service never writes an
    unsubscribe for a contact it had not subscribed (nothing of its own to undo; see the ledger),
    so whether an exit-only contact shows as status 2 or not at all depends on timing."""
    result = {
        name: {email for email, status in members.items() if status == 1}
        for name, members in lists.items()
    }
    return {name: emails for name, emails in result.items() if emails}


def _spell(email: str, rng: random.Random) -> str:
    choice = rng.random()
    if choice < 0.15:
        return email.upper()
    if choice < 0.3:
        return f"  {email.capitalize()} "
    return email


def make_samples(
    *,
    events: int,
    emails: int,
    audiences: int,
    invalid_ratio: float = 0.0,
    seed: int = 7,
    start_ms: int = 1_767_225_600_000,
    with_attributes: bool = True,
) -> SampleSet:
    rng = random.Random(seed)
    schema = load_reader_schema()
    people = [f"person{i:05d}@example.com" for i in range(emails)]
    names = [f"Audience {chr(65 + i % 26)}{i // 26 or ''}" for i in range(audiences)]
    expected: dict[str, dict[str, int]] = {}
    records: list[tuple[bytes, bytes]] = []
    ids: list[str] = []
    invalid = 0
    for index in range(events):
        audience = rng.randrange(audiences)
        action = rng.choice(["ENTERED", "ENTERED", "EXITED"])
        if rng.random() < invalid_ratio:
            raw_email = f"broken-{index}-at-example.com"
            invalid += 1
        else:
            raw_email = _spell(rng.choice(people), rng)
        event_id = str(uuid.UUID(int=rng.getrandbits(128)))
        attributes: dict[str, str] = {}
        if with_attributes and rng.random() < 0.1:
            attributes = {"first_name": "Pat", "last_name": f"Sample{index}"}
        event: dict[str, Any] = {
            "event_id": event_id,
            "occurred_at": start_ms + index,
            "email": raw_email,
            "audience_id": f"aud-{audience}",
            "audience_name": names[audience],
            "action": action,
            "campaign_id": None,
            "treatment_group": None,
            "attributes": attributes,
        }
        key = normalise_email(raw_email)
        records.append((key.encode(), encode_event(event, schema)))
        ids.append(event_id)
        if not raw_email.startswith("broken-"):
            expected.setdefault(names[audience], {})[key] = 1 if action == "ENTERED" else 2
    return SampleSet(records, expected, invalid, ids)


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[tuple[bytes, bytes]],
    *,
    timestamp_ms: int = 0,
) -> dict[int, int]:
    """Produce and wait for every ack; return partition -> end offset (from delivery reports).
    ``timestamp_ms``: the records' timestamp (0: now)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 10, "acks": "all"})
    ends: dict[int, int] = {}
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
            return
        ends[msg.partition()] = max(ends.get(msg.partition(), 0), msg.offset() + 1)

    for key, value in records:
        while True:
            try:
                producer.produce(
                    topic, key=key, value=value, on_delivery=delivered, timestamp=timestamp_ms
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining or errors:
        raise RuntimeError(f"produce failed: {remaining} unflushed, errors: {errors[:3]}")
    return ends

import io
import json
import tracemalloc
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.codec import (
    EmailCache,
    EventDecoder,
    SchemaRegistryClient,
    confluent_frame,
    encode_event,
    load_reader_schema,
    to_event,
)
from service.core.errors import PoisonMessage
from service.core.model import Action

SCHEMA = load_reader_schema()


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": "e1",
        "occurred_at": 1_700_000_000_000,
        "email": "  Jane.Doe@Example.COM ",
        "audience_id": "a1",
        "audience_name": "VIP",
        "action": "ENTERED",
        "campaign_id": None,
        "treatment_group": None,
        "attributes": {"first_name": "Jane"},
    }
    base.update(changes)
    return base


def test_schemaless_roundtrip_normalises_email() -> None:
    decoded = EventDecoder(SCHEMA).decode(encode_event(event(), SCHEMA))
    assert decoded.email == "jane.doe@example.com"
    assert decoded.action is Action.ENTERED
    assert decoded.occurred_at_ms == 1_700_000_000_000
    assert decoded.attributes == {"first_name": "Jane"}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "undecodable"),
        (b"\xff\xfe garbage \x00", "undecodable"),
        (None, "undecodable"),
    ],
)
def test_garbage(value: bytes | None, reason: str) -> None:
    with pytest.raises(PoisonMessage) as info:
        EventDecoder(SCHEMA).decode(value)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"email": "not-an-email"}, "invalid_email"),
        ({"email": "   "}, "missing_field"),
        ({"audience_id": ""}, "missing_field"),
        ({"audience_name": " "}, "missing_field"),
        ({"email": "a@b"}, "invalid_email"),
        ({"email": "\u212aevin@b.co"}, "invalid_email"),  # KELVIN SIGN: not kevin@b.co
        ({"email": "\u00a0kevin@b.co"}, "invalid_email"),  # a non-ASCII space is not trimmed
    ],
)
def test_invalid_fields(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(PoisonMessage) as info:
        EventDecoder(SCHEMA).decode(encode_event(event(**changes), SCHEMA))
    assert info.value.reason == reason


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(PoisonMessage):
        EventDecoder(SCHEMA).decode(encode_event(event(), SCHEMA) + b"\x02xx")


NEWER = json.loads(
    (
        __import__("pathlib").Path(__file__).parents[2] / "schemas/segment_membership_change.avsc"
    ).read_text()
)
NEWER["fields"].append({"name": "score", "type": "double", "default": 0.0})


def registry(schemas: dict[int, dict[str, Any]]) -> SchemaRegistryClient:
    def get(url: str) -> tuple[int, bytes]:
        schema_id = int(url.rsplit("/", 1)[1])
        if schema_id not in schemas:
            return 404, b'{"error_code":40403}'
        return 200, json.dumps({"schema": json.dumps(schemas[schema_id])}).encode()

    return SchemaRegistryClient("http://registry", get)


def test_confluent_framing_with_a_newer_writer_schema() -> None:
    writer = fastavro.parse_schema(NEWER)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, writer, {**event(), "score": 0.7})
    decoder = EventDecoder(SCHEMA, registry({7: NEWER}))
    decoded = decoder.decode(confluent_frame(7, buffer.getvalue()))
    assert decoded.email == "jane.doe@example.com"


def test_confluent_errors() -> None:
    decoder = EventDecoder(SCHEMA, registry({}))
    with pytest.raises(PoisonMessage) as info:
        decoder.decode(encode_event(event(), SCHEMA))
    assert info.value.reason == "bad_magic"
    with pytest.raises(PoisonMessage) as info:
        decoder.decode(confluent_frame(99, encode_event(event(), SCHEMA)))
    assert info.value.reason == "unknown_schema"


def test_incompatible_writer_schema() -> None:
    incompatible = {
        "type": "record",
        "name": "SegmentMembershipChange",
        "namespace": "com.cdp.audience",
        "fields": [{"name": "event_id", "type": "int"}],
    }
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(incompatible), {"event_id": 3})
    decoder = EventDecoder(SCHEMA, registry({3: incompatible}))
    with pytest.raises(PoisonMessage) as info:
        decoder.decode(confluent_frame(3, buffer.getvalue()))
    assert info.value.reason in ("incompatible_schema", "undecodable")


def test_plain_long_reader_matches_logical_type_reader() -> None:
    fast = EventDecoder(load_reader_schema(logical_types=False))
    value = encode_event(event(), SCHEMA)
    assert fast.decode(value) == EventDecoder(SCHEMA).decode(value)


def test_plain_long_reader_with_a_confluent_writer_schema() -> None:
    writer = fastavro.parse_schema(NEWER)
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, writer, {**event(), "score": 0.7})
    decoder = EventDecoder(load_reader_schema(logical_types=False), registry({7: NEWER}))
    assert decoder.decode(confluent_frame(7, buffer.getvalue())).occurred_at_ms == 1_700_000_000_000


GOOD = encode_event(event(), SCHEMA)
BATCH_PARTS = [
    GOOD,
    encode_event(event(email="second@example.com", action="EXITED"), SCHEMA),
    encode_event(event(email="not-an-email"), SCHEMA),
    encode_event(event(audience_id=" "), SCHEMA),
    GOOD + b"\x02xx",  # trailing bytes: would shift every later record if read back to back
    GOOD[:-3],  # cut short: would swallow the start of the next record
    b"\xff\xfe garbage \x00",
    b"",
    None,
]


def outcome(item: Any) -> Any:
    return ("poison", item.reason) if isinstance(item, PoisonMessage) else item


@given(st.lists(st.sampled_from(range(len(BATCH_PARTS))), max_size=12))
def test_decode_batch_answers_what_decode_answers(picks: list[int]) -> None:
    """Read back to back or record by record, every value gets the same event or reason."""
    values = [BATCH_PARTS[i] for i in picks]
    decoder = EventDecoder(load_reader_schema(logical_types=False))
    one_by_one = []
    for value in values:
        try:
            one_by_one.append(outcome(decoder.decode(value)))
        except PoisonMessage as poison:
            one_by_one.append(outcome(poison))
    assert [outcome(item) for item in decoder.decode_batch(values)] == one_by_one


def test_decode_batch_of_good_records_reads_them_in_order() -> None:
    values = [encode_event(event(email=f"p{i}@example.com"), SCHEMA) for i in range(50)]
    events = EventDecoder(SCHEMA).decode_batch(values)
    assert [e.email for e in events if not isinstance(e, PoisonMessage)] == [
        f"p{i}@example.com" for i in range(50)
    ]


def test_a_padded_email_keeps_nothing_of_its_padding() -> None:
    """Issue 19: a megabyte of spaces before a valid address decodes (the trim is the rule), and
    neither the email cache nor the event keeps the megabyte."""
    decoder = EventDecoder(load_reader_schema(logical_types=False))
    values = [
        encode_event(event(email=" " * (1_000_000 + i) + "victim@example.com"), SCHEMA)
        for i in range(5)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        events = decoder.decode_batch(values)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert [e.email for e in events] == ["victim@example.com"] * 5  # type: ignore[union-attr]
    assert kept < 100_000  # the five events and one cache entry, not five megabytes


def test_email_cache_normalises_remembers_and_stays_bounded_by_bytes() -> None:
    cache = EmailCache(max_bytes=1000)
    assert cache(" A@Example.com") == "a@example.com"
    assert cache(" A@Example.com") is cache(" A@Example.com")
    assert set(cache) == {" A@Example.com", "a@example.com"}  # the spelling and the email
    assert cache["a@example.com"] == "a@example.com"  # a hit: the dict alone, no Python code
    with pytest.raises(PoisonMessage) as info:
        cache["not-an-email"]
    assert info.value.reason == "invalid_email"
    assert "not-an-email" not in cache
    for i in range(100):
        cache(f"Person{i}@example.com")
        assert cache.used <= cache.max_bytes
        assert sum(len(k) + 112 for k in cache) == cache.used
    long = " " * 400 + "B@Example.com"
    assert cache(long) == "b@example.com"
    assert long not in cache  # a spelling longer than any email plus some spaces: not a key
    assert "b@example.com" in cache


def test_email_cache_memory_is_what_it_counts() -> None:
    """``max_bytes`` is honest: the cache's real size stays within it (tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = EmailCache(max_bytes=2_000_000)
        for i in range(60_000):
            cache(f" Person.Number{i}@Example.com ")
        size = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.used <= 2_000_000
    assert size < 1.5 * 2_000_000


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"event_id": 7}, "missing_field"),
        ({"email": None}, "missing_field"),
        ({"occurred_at": "yesterday"}, "missing_field"),
        ({"occurred_at": True}, "missing_field"),
        ({"action": "MAYBE"}, "missing_field"),
        ({"action": ["ENTERED"]}, "missing_field"),
    ],
)
def test_records_off_the_common_path_get_a_reason(changes: dict[str, Any], reason: str) -> None:
    """Records from another writer schema (through a registry) may hold other types."""
    with pytest.raises(PoisonMessage) as info:
        to_event(event(**changes))
    assert info.value.reason == reason


def test_a_record_missing_a_field_gets_a_reason() -> None:
    record = event()
    del record["audience_name"]
    with pytest.raises(PoisonMessage) as info:
        to_event(record)
    assert info.value.reason == "missing_field"

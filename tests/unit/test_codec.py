"""The decode contract: every record decoded or refused with a reason, within bounds; writer
schemas checked and remembered per id; a registry outage is back-pressure, never a bad record."""

import io
import json
import time
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.codec import (
    MAX_SCHEMA_CHARS,
    REASONS,
    EventDecoder,
    confluent_frame,
    encode_event,
    load_reader_schema,
    parse_writer_schema,
)
from service.core.errors import PoisonMessage, SchemaUnavailable
from service.core.event_validation import EmailCache, to_event
from service.core.model import MAX_ATTRIBUTES, OCCURRED_AT_MAX_MS, OCCURRED_AT_MIN_MS, Action

SCHEMA = load_reader_schema()
PLAIN = load_reader_schema(logical_types=False)
SCHEMA_JSON: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "schemas/segment_membership_change.avsc").read_text()
)


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


def outcome(item: Any) -> Any:
    if isinstance(item, PoisonMessage):
        return ("poison", item.reason)
    if isinstance(item, SchemaUnavailable):
        return ("unavailable", item.schema_id)
    return item


def decode_outcome(decoder: EventDecoder, value: bytes | None) -> Any:
    try:
        return outcome(decoder.decode(value))
    except (PoisonMessage, SchemaUnavailable) as failure:
        return outcome(failure)


def both_ways(decoder: EventDecoder, value: bytes) -> Any:
    """``decode`` and ``decode_batch`` of one value must agree; returns their answer."""
    one = decode_outcome(decoder, value)
    assert outcome(decoder.decode_batch([value])[0]) == one
    return one


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
        ({"occurred_at": OCCURRED_AT_MIN_MS - 1}, "invalid_field"),
        ({"occurred_at": OCCURRED_AT_MAX_MS + 1}, "invalid_field"),
        ({"occurred_at": 1_700_000_000}, "invalid_field"),  # seconds sent as milliseconds
        ({"occurred_at": -(2**63)}, "invalid_field"),
    ],
)
@pytest.mark.parametrize("reader", [SCHEMA, PLAIN], ids=["logical", "plain"])
def test_invalid_fields(changes: dict[str, Any], reason: str, reader: Any) -> None:
    value = encode_event(event(**changes), SCHEMA)
    assert both_ways(EventDecoder(reader), value) == ("poison", reason)


@pytest.mark.parametrize("occurred", [OCCURRED_AT_MIN_MS, OCCURRED_AT_MAX_MS, 1_767_225_600_123])
@pytest.mark.parametrize("reader", [SCHEMA, PLAIN], ids=["logical", "plain"])
def test_occurred_at_range_is_inclusive(occurred: int, reader: Any) -> None:
    value = encode_event(event(occurred_at=occurred), SCHEMA)
    assert both_ways(EventDecoder(reader), value).occurred_at_ms == occurred


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(PoisonMessage):
        EventDecoder(SCHEMA).decode(encode_event(event(), SCHEMA) + b"\x02xx")


# The reproducers (schemaless, our schema): values fastavro accepts that are not valid.
ENUM_INDEX_MINUS_ONE = "04653180a0abfef9620c6140622e636f0461310656495001000000"
ELEVEN_BYTE_VARINT = "046531ffffffffffffffffffff010c6140622e636f0461310656495000000000"


@pytest.mark.parametrize("reader", [SCHEMA, PLAIN], ids=["logical", "plain"])
@pytest.mark.parametrize("hex_value", [ENUM_INDEX_MINUS_ONE, ELEVEN_BYTE_VARINT])
def test_values_fastavro_accepts_are_refused(hex_value: str, reader: Any) -> None:
    value = bytes.fromhex(hex_value)
    fastavro.schemaless_reader(io.BytesIO(value), PLAIN, None)  # fastavro alone: no complaint
    assert both_ways(EventDecoder(reader), value) == ("poison", "undecodable")


def test_the_reproducers_are_otherwise_good_records() -> None:
    """Each reproducer differs from a valid record in exactly the field it is about."""
    enum_ok = bytearray.fromhex(ENUM_INDEX_MINUS_ONE)
    enum_ok[-4] = 0x02  # EXITED, properly
    assert EventDecoder(PLAIN).decode(bytes(enum_ok)).action is Action.EXITED
    varint_ok = bytes.fromhex(ELEVEN_BYTE_VARINT.replace("ffffffffffffffffffff01", "80a0abfef962"))
    assert EventDecoder(PLAIN).decode(varint_ok).email == "a@b.co"


def test_occurred_at_from_a_logical_type_is_exact() -> None:
    """fastavro's datetime turned back into milliseconds exactly (a float product is 1 ms off
    for some values, 1_767_225_600_123 among them)."""
    for occurred in (1_767_225_600_123, 1_700_000_000_001, 946_684_800_007):
        record = to_event(
            fastavro.schemaless_reader(
                io.BytesIO(encode_event(event(occurred_at=occurred), SCHEMA)), SCHEMA, None
            )
        )
        assert record.occurred_at_ms == occurred
    naive = to_event(event(occurred_at=datetime(2024, 1, 2, 3, 4, 5, 6000)))
    aware = to_event(event(occurred_at=datetime(2024, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)))
    assert naive.occurred_at_ms == aware.occurred_at_ms == 1_704_164_645_006


# --- Writer schemas from a registry -------------------------------------------------------------


class Lookup:
    """A registry stand-in: schema texts by id, a switch for an outage, every call counted."""

    def __init__(self, schemas: dict[int, Any]) -> None:
        self.texts = {k: v if isinstance(v, str) else json.dumps(v) for k, v in schemas.items()}
        self.calls: list[int] = []
        self.down = False

    def __call__(self, schema_id: int) -> Any:
        self.calls.append(schema_id)
        if self.down:
            raise SchemaUnavailable(schema_id, "registry down")
        if schema_id not in self.texts:
            raise PoisonMessage("unknown_schema", f"schema id {schema_id} is not in the registry")
        return parse_writer_schema(self.texts[schema_id])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def with_field(schema: dict[str, Any], field: dict[str, Any]) -> dict[str, Any]:
    copy = json.loads(json.dumps(schema))
    copy["fields"].append(field)
    return copy


def write(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)
    return buffer.getvalue()


def zigzag(number: int) -> bytes:
    number = (number << 1) ^ (number >> 63)
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


NEWER = with_field(SCHEMA_JSON, {"name": "score", "type": "double", "default": 0.0})


def test_confluent_framing_with_a_newer_writer_schema() -> None:
    decoder = EventDecoder(SCHEMA, Lookup({7: NEWER}))
    decoded = decoder.decode(confluent_frame(7, write(NEWER, {**event(), "score": 0.7})))
    assert decoded.email == "jane.doe@example.com"


def test_confluent_errors() -> None:
    decoder = EventDecoder(SCHEMA, Lookup({}))
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
    decoder = EventDecoder(SCHEMA, Lookup({3: incompatible}))
    value = confluent_frame(3, write(incompatible, {"event_id": 3}))
    assert both_ways(decoder, value) == ("poison", "incompatible_schema")


@pytest.mark.parametrize(
    "change",
    [
        {"name": "Renamed"},  # the record
        {"namespace": "com.other"},  # the record's full name
        {"enum": "Renamed"},  # the enum
    ],
    ids=["record", "namespace", "enum"],
)
def test_a_renamed_writer_schema_is_refused_by_decode_and_decode_batch_alike(
    change: dict[str, str],
) -> None:
    renamed = json.loads(json.dumps(SCHEMA_JSON))
    if "enum" in change:
        renamed["fields"][5]["type"]["name"] = change["enum"]
    else:
        renamed.update(change)
    value = confluent_frame(4, write(renamed, event()))
    fresh = both_ways(EventDecoder(PLAIN, Lookup({4: renamed})), value)
    # The same after the writer is known (when decode_batch would take the fast path).
    decoder = EventDecoder(PLAIN, Lookup({4: renamed}))
    decoder.decode_batch([value])
    assert both_ways(decoder, value) == fresh
    assert decoder._writers[4].fast is False
    if "namespace" not in change:  # fastavro compares unqualified names
        assert fresh == ("poison", "incompatible_schema")


def test_our_own_schema_from_the_registry_is_read_by_the_fast_reader() -> None:
    """The .avsc as registered (occurred_at with its timestamp-millis): our layout."""
    decoder = EventDecoder(PLAIN, Lookup({5: SCHEMA_JSON}))
    value = confluent_frame(5, encode_event(event(), SCHEMA))
    first = both_ways(decoder, value)
    assert decoder._writers[5].fast is True
    assert both_ways(decoder, value) == first
    assert first.occurred_at_ms == 1_700_000_000_000


HOSTILE_SCHEMAS = {
    "wrong-default": with_field(SCHEMA_JSON, {"name": "n", "type": "int", "default": "zz"}),
    "negative-precision": with_field(
        SCHEMA_JSON,
        {
            "name": "d",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": -1, "scale": 0},
        },
    ),
    "json-3000-deep": '{"type": "record", "name": "R", "fields": [{"name": "x", "type": '
    + '{"type": "array", "items": ' * 3000
    + '"null"'
    + "}" * 3000
    + "}]}",
    "array-60-deep": with_field(
        SCHEMA_JSON,
        {"name": "deep", "type": json.loads('{"type":"array","items":' * 60 + '"int"' + "}" * 60)},
    ),
    "not-json": "{",
    "not-a-record": '"string"',
    "too-long": json.dumps(
        with_field(SCHEMA_JSON, {"name": "x" * MAX_SCHEMA_CHARS, "type": "int"})
    ),
    "undefined-type": with_field(SCHEMA_JSON, {"name": "u", "type": "com.example.Missing"}),
    "a-million-values-each": with_field(
        SCHEMA_JSON,
        {
            "name": "wide",
            "type": {
                "type": "record",
                "name": "W1",
                "fields": [
                    {
                        "name": f"f{i}",
                        "type": {
                            "type": "record",
                            "name": f"W2_{i}",
                            "fields": [{"name": f"g{j}", "type": "null"} for j in range(100)],
                        },
                    }
                    for i in range(100)
                ],
            },
        },
    ),
}


@pytest.mark.parametrize("name", HOSTILE_SCHEMAS)
def test_a_writer_schema_that_cannot_be_used_is_refused_once_and_remembered(name: str) -> None:
    lookup = Lookup({11: HOSTILE_SCHEMAS[name]})
    decoder = EventDecoder(PLAIN, lookup)
    value = confluent_frame(11, encode_event(event(), SCHEMA))
    began = time.perf_counter()
    answers = {outcome(item) for item in decoder.decode_batch([value] * 500)}
    answers.add(decode_outcome(decoder, value))
    assert time.perf_counter() - began < 2.0  # the parse is paid once, not per record
    assert answers == {("poison", "incompatible_schema")}
    assert lookup.calls == [11]


def test_an_unknown_schema_id_is_asked_once_then_again_after_a_while() -> None:
    clock = Clock()
    lookup = Lookup({})
    decoder = EventDecoder(PLAIN, lookup, clock=clock, unknown_ttl=300)
    value = confluent_frame(404, encode_event(event(), SCHEMA))
    assert {outcome(item) for item in decoder.decode_batch([value] * 1000)} == {
        ("poison", "unknown_schema")
    }
    for _ in range(10):
        assert decode_outcome(decoder, value) == ("poison", "unknown_schema")
    assert lookup.calls == [404]
    clock.now += 301  # a registry replica may have lagged: asked again, once
    lookup.texts[404] = json.dumps(SCHEMA_JSON)
    assert decoder.decode_batch([value] * 3)[2].email == "jane.doe@example.com"  # type: ignore[union-attr]
    assert lookup.calls == [404, 404]


ZERO_BYTE_ITEMS = {
    "nulls": "null",
    "empty-records": {"type": "record", "name": "Empty", "fields": []},
    "zero-size-fixed": {"type": "fixed", "name": "Nothing", "size": 0},
}


@pytest.mark.parametrize("items", ZERO_BYTE_ITEMS.values(), ids=ZERO_BYTE_ITEMS.keys())
@pytest.mark.parametrize("count", [2**62, -(2**62), 2**30, 4097])
def test_an_array_of_items_of_no_bytes_cannot_wedge_the_decoder(items: Any, count: int) -> None:
    """Issue 19: a writer schema with an array field we do not read; a record declaring 2**62
    (or 2**30) items that take no bytes. fastavro loops for ever; the decoder refuses at once."""
    writer = with_field(
        SCHEMA_JSON, {"name": "pad", "type": {"type": "array", "items": items}, "default": []}
    )
    body = write(writer, {**event(), "pad": []})
    assert body.endswith(b"\x00")  # the empty array, last: replaced by the hostile block
    block = zigzag(count) + (zigzag(0) if count < 0 else b"")  # a negative count: a byte size
    value = confluent_frame(2, body[:-1] + block + b"\x00")
    decoder = EventDecoder(PLAIN, Lookup({2: writer}))
    began = time.perf_counter()
    assert both_ways(decoder, value) == ("poison", "undecodable")
    assert time.perf_counter() - began < 0.1
    # A modest array of the same items is a good record.
    fine = confluent_frame(2, body[:-1] + zigzag(100) + b"\x00")
    assert both_ways(decoder, fine).email == "jane.doe@example.com"


def test_a_block_size_that_does_not_match_its_items_is_refused() -> None:
    writer = with_field(
        SCHEMA_JSON, {"name": "tags", "type": {"type": "array", "items": "int"}, "default": []}
    )
    body = write(writer, {**event(), "tags": []})[:-1]
    good = body + zigzag(-2) + zigzag(2) + b"\x02\x04" + b"\x00"
    bad = body + zigzag(-2) + zigzag(5) + b"\x02\x04" + b"\x00"
    decoder = EventDecoder(PLAIN, Lookup({8: writer}))
    assert both_ways(decoder, confluent_frame(8, good)).email == "jane.doe@example.com"
    assert both_ways(decoder, confluent_frame(8, bad)) == ("poison", "undecodable")


def test_a_record_nested_past_the_limit_is_refused_not_a_recursion_error() -> None:
    node = {
        "type": "record",
        "name": "Node",
        "fields": [{"name": "next", "type": ["null", "Node"], "default": None}],
    }
    writer = with_field(SCHEMA_JSON, {"name": "chain", "type": ["null", node], "default": None})
    body = write(writer, {**event(), "chain": None})[:-1]
    decoder = EventDecoder(PLAIN, Lookup({9: writer}))
    shallow = confluent_frame(9, body + b"\x02" * 10 + b"\x00")
    assert both_ways(decoder, shallow).email == "jane.doe@example.com"
    deep = confluent_frame(9, body + b"\x02" * 5000 + b"\x00")
    assert both_ways(decoder, deep) == ("poison", "undecodable")


# --- Bounded memory: what one record can make the decoder keep -----------------------------------


def test_a_padded_email_keeps_nothing_of_its_padding() -> None:
    """Issue 19: a megabyte of spaces before a valid address decodes (the trim is the rule), and
    neither the email cache nor the event keeps the megabyte."""
    decoder = EventDecoder(PLAIN)
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


def test_too_many_attributes_are_refused_quickly() -> None:
    """Issue 19: 100,000 attribute keys in a 0.89 MB record took 0.3 s and kept 10 MB."""
    many = {f"k{i}": "v" for i in range(100_000)}
    value = encode_event(event(attributes=many), SCHEMA)
    decoder = EventDecoder(PLAIN)
    began = time.perf_counter()
    assert both_ways(decoder, value) == ("poison", "invalid_field")
    assert time.perf_counter() - began < 0.1
    most = {f"k{i}": "v" for i in range(MAX_ATTRIBUTES)}
    assert both_ways(decoder, encode_event(event(attributes=most), SCHEMA)).attributes == most


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


# --- A registry outage ---------------------------------------------------------------------------


def test_an_outage_is_schema_unavailable_with_back_off_then_every_record_decodes() -> None:
    clock = Clock()
    lookup = Lookup({5: SCHEMA_JSON, 6: NEWER})
    lookup.down = True
    decoder = EventDecoder(PLAIN, lookup, clock=clock, backoff_base=1.0, backoff_cap=8.0)
    values = [
        confluent_frame(
            5 + i % 2,
            write(NEWER if i % 2 else SCHEMA_JSON, {**event(email=f"p{i}@x.io"), "score": 1.0}),
        )
        for i in range(100)
    ]
    first = decoder.decode_batch(values)
    assert all(isinstance(item, SchemaUnavailable) for item in first)
    assert lookup.calls == [5]  # one probe; the other id was not asked in the same batch
    delays = []
    for _ in range(6):
        assert all(isinstance(item, SchemaUnavailable) for item in decoder.decode_batch(values))
        item = decoder.decode_batch(values[:1])[0]
        assert isinstance(item, SchemaUnavailable)
        delays.append(item.retry_after)
        clock.now += item.retry_after
    # Exponential, capped; never more than one probe per interval per id.
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert len(lookup.calls) <= 1 + 2 * 6
    with pytest.raises(SchemaUnavailable):
        decoder.decode(values[0])
    lookup.down = False
    clock.now += 8
    back = decoder.decode_batch(values)
    assert [e.email for e in back] == [f"p{i}@x.io" for i in range(100)]  # type: ignore[union-attr]
    assert lookup.calls[-2:] == [5, 6]


def test_a_lookup_that_fails_unexpectedly_is_an_outage_not_a_bad_record() -> None:
    def broken(schema_id: int) -> Any:
        raise ConnectionResetError("boom")

    clock = Clock()
    decoder = EventDecoder(PLAIN, broken, clock=clock)
    item = decoder.decode_batch([confluent_frame(1, encode_event(event(), SCHEMA))])[0]
    assert isinstance(item, SchemaUnavailable)
    assert "ConnectionResetError" in item.detail


def test_decode_batch_reasons_are_enumerated() -> None:
    assert set(REASONS) == {
        "undecodable",
        "bad_magic",
        "unknown_schema",
        "incompatible_schema",
        "missing_field",
        "invalid_field",
        "invalid_email",
    }


def test_plain_long_reader_matches_logical_type_reader() -> None:
    fast = EventDecoder(load_reader_schema(logical_types=False))
    value = encode_event(event(), SCHEMA)
    assert fast.decode(value) == EventDecoder(SCHEMA).decode(value)


def test_plain_long_reader_with_a_confluent_writer_schema() -> None:
    decoder = EventDecoder(PLAIN, Lookup({7: NEWER}))
    value = confluent_frame(7, write(NEWER, {**event(), "score": 0.7}))
    assert decoder.decode(value).occurred_at_ms == 1_700_000_000_000


GOOD = encode_event(event(), SCHEMA)
BATCH_PARTS = [
    GOOD,
    encode_event(event(email="second@example.com", action="EXITED"), SCHEMA),
    encode_event(event(email="not-an-email"), SCHEMA),
    encode_event(event(audience_id=" "), SCHEMA),
    encode_event(event(occurred_at=0), SCHEMA),
    bytes.fromhex(ENUM_INDEX_MINUS_ONE),
    bytes.fromhex(ELEVEN_BYTE_VARINT),
    GOOD + b"\x02xx",  # trailing bytes: would shift every later record if read back to back
    GOOD[:-3],  # cut short: would swallow the start of the next record
    b"\xff\xfe garbage \x00",
    b"",
    None,
]


@given(st.lists(st.sampled_from(range(len(BATCH_PARTS))), max_size=12))
def test_decode_batch_answers_what_decode_answers(picks: list[int]) -> None:
    """Read back to back or record by record, every value gets the same event or reason."""
    values = [BATCH_PARTS[i] for i in picks]
    decoder = EventDecoder(load_reader_schema(logical_types=False))
    one_by_one = [decode_outcome(decoder, value) for value in values]
    assert [outcome(item) for item in decoder.decode_batch(values)] == one_by_one


def test_decode_batch_of_good_records_reads_them_in_order() -> None:
    values = [encode_event(event(email=f"p{i}@example.com"), SCHEMA) for i in range(50)]
    events = EventDecoder(SCHEMA).decode_batch(values)
    assert [e.email for e in events if not isinstance(e, PoisonMessage | SchemaUnavailable)] == [
        f"p{i}@example.com" for i in range(50)
    ]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"event_id": 7}, "missing_field"),
        ({"email": None}, "missing_field"),
        ({"occurred_at": "yesterday"}, "missing_field"),
        ({"occurred_at": True}, "missing_field"),
        ({"occurred_at": 10**20}, "invalid_field"),
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

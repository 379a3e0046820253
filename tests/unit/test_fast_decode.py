"""``fast_decode.read_event`` against ``EventDecoder.decode``: the same answer, or it declines.

The reference is what the service does for every record the fast reader declines: the bounds
check (``avro_guard``), ``fastavro.schemaless_reader``, then ``to_event``.
"""

import io
import json
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.codec import (
    EventDecoder,
    confluent_frame,
    encode_event,
    load_reader_schema,
    parse_writer_schema,
)
from service.core.errors import PoisonMessage
from service.core.event_validation import EmailCache
from service.core.fast_decode import LAYOUT, layout_of, read_event
from service.core.model import MAX_ATTRIBUTES, OCCURRED_AT_MAX_MS, OCCURRED_AT_MIN_MS
from service.devtools.samples import make_samples

SCHEMA = load_reader_schema(logical_types=False)


def reference(value: bytes) -> Any:
    """``decode`` (bounds, fastavro, ``to_event``): the event, or ("poison", reason, message)."""
    try:
        return EventDecoder(SCHEMA).decode(value)
    except PoisonMessage as poison:
        return ("poison", poison.reason, str(poison))


def fast(value: bytes) -> Any:
    try:
        return read_event(value, 0, EmailCache())
    except PoisonMessage as poison:
        return ("poison", poison.reason, str(poison))


# Text that reaches every branch: empty, blank, non-ASCII (several UTF-8 bytes a character),
# and long enough to need a two-byte length (then the fast reader declines).
texts = st.one_of(
    st.sampled_from(["", " ", "\t", "VIP", " a1 ", "Zoë's list", "名单"]),
    st.text(max_size=80),
)
emails = st.one_of(
    st.from_regex(r"[A-Za-z0-9._-]{1,20}@[a-z0-9-]{1,12}\.(com|io)", fullmatch=True),
    st.sampled_from(["  Jane.Doe@Example.COM ", "not-an-email", "", "x" * 70 + "@example.com"]),
    st.text(max_size=30),
)
events = st.fixed_dictionaries(
    {
        "event_id": texts,
        "occurred_at": st.one_of(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.integers(min_value=1_600_000_000_000, max_value=1_900_000_000_000),
        ),
        "email": emails,
        "audience_id": texts,
        "audience_name": texts,
        "action": st.sampled_from(["ENTERED", "EXITED"]),
        "campaign_id": st.one_of(st.none(), texts),
        "treatment_group": st.one_of(st.none(), texts),
        "attributes": st.one_of(
            st.just({}),
            st.dictionaries(texts, texts, max_size=4),
            st.dictionaries(
                st.text(min_size=3, max_size=6), st.just("v"), min_size=64, max_size=70
            ),
        ),
    }
)


@settings(max_examples=400)
@given(events)
def test_an_encoded_event_reads_as_fastavro_reads_it_or_is_declined(record: dict[str, Any]) -> None:
    value = encode_event(record, SCHEMA)
    got = fast(value)
    if got is not None:
        assert got == reference(value)


@settings(max_examples=600)
@given(events, st.data())
def test_damaged_bytes_read_as_fastavro_reads_them_or_are_declined(
    record: dict[str, Any], data: st.DataObject
) -> None:
    """Bytes flipped, cut, inserted or appended: never an answer fastavro would not give."""
    value = bytearray(encode_event(record, SCHEMA))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        where = data.draw(st.integers(min_value=0, max_value=len(value)))
        change = data.draw(st.sampled_from(["flip", "cut", "insert", "append"]))
        byte = data.draw(st.integers(min_value=0, max_value=255))
        if change == "flip" and where < len(value):
            value[where] = byte
        elif change == "cut":
            del value[where:]
        elif change == "insert":
            value.insert(where, byte)
        else:
            value.append(byte)
    got = fast(bytes(value))
    if got is not None:
        assert got == reference(bytes(value))


EXAMPLES = [
    encode_event(
        {
            "event_id": "e-1",
            "occurred_at": 1_767_225_600_123,
            "email": " Pat@Example.com",
            "audience_id": "a1",
            "audience_name": "VIP",
            "action": "ENTERED",
            "campaign_id": campaign,
            "treatment_group": "control",
            "attributes": attributes,
        },
        SCHEMA,
    )
    for campaign, attributes in [(None, {}), ("c-9", {"first_name": "Pat", "x": ""})]
]


@pytest.mark.parametrize("example", EXAMPLES, ids=["plain", "with-map"])
def test_every_single_byte_change_reads_as_fastavro_reads_it_or_is_declined(
    example: bytes,
) -> None:
    """Exhaustive where Hypothesis samples: each byte replaced by each of the 256 values, a
    byte inserted anywhere, the record cut anywhere (enum and union indexes, lengths, counts)."""
    variants = [example[:cut] for cut in range(len(example))]
    for where in range(len(example) + 1):
        for byte in range(256):
            variants.append(example[:where] + bytes([byte]) + example[where + 1 :])
            variants.append(example[:where] + bytes([byte]) + example[where:])
    read_here = 0
    for value in variants:
        got = fast(value)
        if got is not None:
            read_here += 1
            assert got == reference(value), value
    assert read_here > len(variants) // 10  # many damaged records are still well-formed


def test_the_common_shape_is_read_here() -> None:
    """Every sample record (the benchmark's and the demo's shape) takes the fast path, with the
    same answer: without this, a reader that always declined would pass the tests above."""
    samples = make_samples(events=2_000, emails=300, audiences=5, invalid_ratio=0.05, seed=5)
    for _, value in samples.records:
        got = fast(value)
        assert got is not None
        assert got == reference(value)
    assert samples.invalid > 0  # invalid emails were among them: the same poison, read here


# One plain record; each test changes the fields it is about.
RECORD: dict[str, Any] = {
    "event_id": "e1",
    "occurred_at": 1_700_000_000_000,
    "email": "Jane@Example.com",
    "audience_id": "a1",
    "audience_name": "VIP",
    "action": "EXITED",
    "campaign_id": None,
    "treatment_group": None,
    "attributes": {},
}


@pytest.mark.parametrize(
    "changes",
    [
        {"attributes": {"first_name": "Jane", "last_name": "Doe"}},
        {"campaign_id": "c-1", "treatment_group": "control"},
        {"occurred_at": OCCURRED_AT_MIN_MS},
        {"occurred_at": OCCURRED_AT_MAX_MS},
        {"audience_name": "  Padded  "},
    ],
)
def test_the_less_common_fields_are_read_here_too(changes: dict[str, Any]) -> None:
    value = encode_event({**RECORD, **changes}, SCHEMA)
    got = fast(value)
    assert got is not None
    assert got == reference(value)


@pytest.mark.parametrize(
    "changes",
    [
        {"event_id": " "},  # to_event names it
        {"audience_id": ""},
        {"email": "x" * 70 + "@example.com"},  # a two-byte length
        {"occurred_at": 2**63 - 1},  # a ten-byte long
        {"occurred_at": 2**62 - 1},  # out of range (to_event names it)
        {"occurred_at": OCCURRED_AT_MIN_MS - 1},
        {"occurred_at": OCCURRED_AT_MAX_MS + 1},
        {"occurred_at": -1},
    ],
)
def test_unusual_records_are_left_to_fastavro(changes: dict[str, Any]) -> None:
    value = encode_event({**RECORD, **changes}, SCHEMA)
    assert fast(value) is None
    decoded = EventDecoder(SCHEMA).decode_batch([value])[0]
    expected = reference(value)
    if isinstance(decoded, PoisonMessage):
        assert ("poison", decoded.reason, str(decoded)) == expected
    else:
        assert decoded == expected


def changed(change: Any) -> Any:
    copy = json.loads(json.dumps(SCHEMA_JSON))
    change(copy)
    return fastavro.parse_schema(copy)


def test_layout_is_our_schema_names_included() -> None:
    assert layout_of(SCHEMA) == LAYOUT
    # timestamp-millis: the same bytes (to_event turns fastavro's datetime back exactly)
    assert layout_of(load_reader_schema()) == LAYOUT
    assert changed(lambda s: None) is not None and layout_of(changed(lambda s: None)) == LAYOUT
    for change in [
        lambda s: s["fields"].append({"name": "score", "type": "double", "default": 0.0}),
        lambda s: s["fields"][5]["type"].update(symbols=["EXITED", "ENTERED"]),  # other order
        lambda s: s["fields"][5]["type"].update(name="Renamed"),  # the enum renamed
        lambda s: s["fields"][5]["type"].update(namespace="com.other"),
        lambda s: s.update(name="Renamed"),  # the record renamed
        lambda s: s.update(namespace="com.other"),
        lambda s: s["fields"][1].update(type={"type": "long", "logicalType": "timestamp-micros"}),
    ]:
        assert layout_of(changed(change)) != LAYOUT
    assert layout_of("string") is None


def map_blocks(*blocks: list[tuple[str, str]]) -> bytes:
    """An ``attributes`` map written as the given blocks (each under 64 entries)."""
    out = bytearray()
    for block in blocks:
        out.append(len(block) * 2)
        for key, value in block:
            out += bytes([len(key) * 2]) + key.encode() + bytes([len(value) * 2]) + value.encode()
    return bytes(out + b"\x00")


def test_the_fast_reader_reads_attributes_up_to_the_limit_only() -> None:
    """The limit counts entries as written (a repeated key too), as avro_guard does."""
    head = encode_event({**RECORD, "attributes": {}}, SCHEMA)[:-1]
    full = [[(f"k{b}.{i}", "v") for i in range(MAX_ATTRIBUTES // 8)] for b in range(8)]
    value = head + map_blocks(*full)
    assert fast(value) is not None
    assert fast(value) == reference(value)
    assert len(fast(value).attributes) == MAX_ATTRIBUTES
    for over in (
        head + map_blocks(*full, [("x", "y")]),
        head + map_blocks(*([[("k", "v")] * 60] * 5)),
    ):
        assert fast(over) is None
        assert reference(over)[:2] == ("poison", "invalid_field")


SCHEMA_JSON: dict[str, Any] = {
    "type": "record",
    "name": "SegmentMembershipChange",
    "namespace": "com.cdp.audience",
    "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "occurred_at", "type": "long"},
        {"name": "email", "type": "string"},
        {"name": "audience_id", "type": "string"},
        {"name": "audience_name", "type": "string"},
        {
            "name": "action",
            "type": {"type": "enum", "name": "MembershipAction", "symbols": ["ENTERED", "EXITED"]},
        },
        {"name": "campaign_id", "type": ["null", "string"], "default": None},
        {"name": "treatment_group", "type": ["null", "string"], "default": None},
        {"name": "attributes", "type": {"type": "map", "values": "string"}, "default": {}},
    ],
}


def registry(schemas: dict[int, dict[str, Any]]) -> Any:
    def lookup(schema_id: int) -> Any:
        return parse_writer_schema(json.dumps(schemas[schema_id]))

    return lookup


def test_with_a_registry_the_fast_path_is_per_writer_schema() -> None:
    """Same layout from the registry: read fast after the first record. A newer writer schema
    (one more field): fastavro resolves it, every time."""
    newer = json.loads(json.dumps(SCHEMA_JSON))
    newer["fields"].append({"name": "score", "type": "double", "default": 0.0})
    decoder = EventDecoder(SCHEMA, registry({3: SCHEMA_JSON, 4: newer}))
    record = {**RECORD, "email": "A@B.io"}
    same = confluent_frame(3, encode_event(record, SCHEMA))
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(newer), {**record, "score": 1.5})
    other = confluent_frame(4, buffer.getvalue())
    batch = decoder.decode_batch([same, other, same, other])
    assert [getattr(e, "email", None) for e in batch] == ["a@b.io"] * 4
    assert {k: w.fast for k, w in decoder._writers.items()} == {3: True, 4: False}
    assert decoder._fast_start(same) == 5
    assert decoder._fast_start(other) is None

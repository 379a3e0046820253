"""The decode contract on schemaless records: generated, damaged, and made hostile (long varints,
negative indexes, huge counts and lengths). Every record is an event or a refusal, within the
bounds, and ``decode_batch`` answers what ``decode`` answers."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from service.core.codec import EventDecoder, encode_event, load_reader_schema
from service.core.model import OCCURRED_AT_MAX_MS, OCCURRED_AT_MIN_MS
from tests.fuzz.bounds import assert_contract, fuzz, outcome, peak_memory, timed
from tests.fuzz.reference import expected, numbers_in

PLAIN = load_reader_schema(logical_types=False)
LOGICAL = load_reader_schema()

texts = st.one_of(
    st.sampled_from(["", " ", "\t", "VIP", " a1 ", "Zoë's list", "名单", "\x00\x1b[31m"]),
    st.text(max_size=80),
    st.text(max_size=40).map(lambda t: t * 100),  # up to 4,000 characters, cheaply
)
emails = st.one_of(
    st.from_regex(r"[A-Za-z0-9._%+-]{1,20}@[A-Za-z0-9-]{1,12}\.(com|io|CO)", fullmatch=True),
    st.builds(
        lambda pad, email, tail: pad + email + tail,
        st.sampled_from(["", " ", "\t\n", " " * 5000, "\u00a0", "\u3000"]),
        st.sampled_from(["a@b.co", "Jane@Example.COM", "\u212aevin@b.co", "x@b\u0130.com"]),
        st.sampled_from(["", " ", "\r\n", "\u2028"]),
    ),
    st.text(max_size=40),
)
events = st.fixed_dictionaries(
    {
        "event_id": texts,
        "occurred_at": st.one_of(
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.integers(min_value=OCCURRED_AT_MIN_MS - 5, max_value=OCCURRED_AT_MAX_MS + 5),
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
                st.text(min_size=1, max_size=6), st.just("v"), min_size=200, max_size=300
            ),
        ),
    }
)

# Byte patterns that fastavro reads without complaint but are not valid Avro, or that declare
# more than the record holds.
HOSTILE = [
    bytes.fromhex("ffffffffffffffffffff01"),  # an 11-byte varint
    bytes.fromhex("ffffffffffffffffff7f"),  # 10 bytes beyond 64 bits
    b"\x01",  # -1: an enum or union index, a negative length or count
    bytes.fromhex("feffffffffffffff7f"),  # a count or length of about 2**62
    bytes.fromhex("fdffffffffffffff7f") + b"\x02",  # a negative count with a byte size
    b"\x80" * 12,  # a varint that never ends
]


def zigzag(number: int) -> bytes:
    number = (number << 1) ^ (number >> 63)
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


# A number put where a length, the time, an enum or union index, or a block count was.
NUMBERS = st.one_of(
    st.sampled_from(HOSTILE),
    st.integers(min_value=-3, max_value=3).map(zigzag),
    st.integers(min_value=-(2**63), max_value=2**63 - 1).map(zigzag),
    st.sampled_from([b"\x80\x00", b"\x81\x80\x00", bytes.fromhex("80808080808080808000")]),
)


def damaged(data: st.DataObject, value: bytes) -> bytes:
    out = bytearray(value)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        where = data.draw(st.integers(min_value=0, max_value=len(out)))
        change = data.draw(
            st.sampled_from(["flip", "cut", "insert", "append", "hostile", "number", "number"])
        )
        numbers = numbers_in(bytes(out))
        if change == "number" and numbers:
            start, end = data.draw(st.sampled_from(numbers))
            out[start:end] = data.draw(NUMBERS)
        elif change == "flip" and where < len(out):
            out[where] = data.draw(st.integers(min_value=0, max_value=255))
        elif change == "cut":
            del out[where:]
        elif change == "insert":
            out.insert(where, data.draw(st.integers(min_value=0, max_value=255)))
        elif change == "append":
            out.append(data.draw(st.integers(min_value=0, max_value=255)))
        else:
            pattern = data.draw(st.sampled_from(HOSTILE))
            end = where + data.draw(st.integers(min_value=0, max_value=2))
            out[where:end] = pattern
    return bytes(out)


def check(value: bytes, reader: Any = PLAIN) -> Any:
    """The contract's bounds, ``decode_batch`` agreeing with ``decode``, and both agreeing with
    an independent strict reader (``reference``): every invalid encoding refused (an enum
    index of -1, an 11-byte varint...), every valid one read to the same event."""
    decoder = EventDecoder(reader)
    result, seconds = timed(lambda: decoder.decode(value))
    memory = peak_memory(lambda: EventDecoder(reader).decode(value))
    assert_contract(result, seconds, len(value), memory)
    assert outcome(result) == expected(value)
    batch = decoder.decode_batch([value, value])
    assert [outcome(item) for item in batch] == [outcome(result)] * 2
    return result


@fuzz(400)
@given(events, st.sampled_from([PLAIN, LOGICAL]))
def test_generated_records_meet_the_contract(record: dict[str, Any], reader: Any) -> None:
    check(encode_event(record, PLAIN), reader)


@fuzz(600)
@given(events, st.data())
def test_damaged_and_hostile_records_meet_the_contract(
    record: dict[str, Any], data: st.DataObject
) -> None:
    check(damaged(data, encode_event(record, PLAIN)))


@st.composite
def blocked_attributes(draw: st.DrawFn) -> bytes:
    """An attributes map written by hand: several blocks, some with a negative count and a byte
    size (right or off by one), short keys that may repeat, up to about 500 entries in all."""
    out = bytearray()
    repeat = draw(st.booleans())
    sized = draw(st.sampled_from([None, False, True]))  # per block, none or all with a size
    sizes = st.one_of(st.integers(1, 63), st.just(63))
    for block, size in enumerate(draw(st.lists(sizes, max_size=8))):
        keys = [b"k0" if repeat else f"k{block}.{i}".encode() for i in range(size)]
        items = b"".join(zigzag(len(key)) + key + zigzag(1) + b"v" for key in keys)
        if sized if sized is not None else draw(st.booleans()):
            off = draw(st.sampled_from([0, 0, 0, 1, -1]))
            out += zigzag(-size) + zigzag(len(items) + off) + items
        else:
            out += zigzag(size) + items
    return bytes(out + b"\x00")


# Records the fast reader reads (short fields, a valid email, a time in range), so that the
# map is what decides who reads them.
plain_events = st.fixed_dictionaries(
    {
        "event_id": st.text(min_size=1, max_size=10),
        "occurred_at": st.integers(min_value=OCCURRED_AT_MIN_MS, max_value=OCCURRED_AT_MAX_MS),
        "email": st.from_regex(r"[a-z0-9.]{1,10}@[a-z]{1,8}\.com", fullmatch=True),
        "audience_id": st.sampled_from(["a1", " a2 "]),
        "audience_name": st.sampled_from(["VIP", "Churn risk"]),
        "action": st.sampled_from(["ENTERED", "EXITED"]),
        "campaign_id": st.one_of(st.none(), st.just("c1")),
        "treatment_group": st.none(),
        "attributes": st.just({}),
    }
)


@fuzz(200)
@given(st.one_of(plain_events, events), blocked_attributes())
def test_attributes_in_blocks_meet_the_contract(record: dict[str, Any], blocks: bytes) -> None:
    """The fast reader reads small positive blocks, fastavro the rest; the limit of 256 counts
    entries as written, in all blocks, a repeated key included."""
    head = encode_event({**record, "attributes": {}}, PLAIN)
    check(head[:-1] + blocks)


@fuzz(200)
@given(st.binary(max_size=200))
def test_any_bytes_meet_the_contract(value: bytes) -> None:
    check(value)


@fuzz(60)
@given(st.lists(st.tuples(events, st.booleans()), min_size=1, max_size=30), st.data())
def test_a_batch_answers_each_record_as_decode_does(
    records: list[tuple[dict[str, Any], bool]], data: st.DataObject
) -> None:
    """Back to back in one batch (the fast reader and fastavro interleaved), record by record."""
    values = [
        damaged(data, encode_event(r, PLAIN)) if hurt else encode_event(r, PLAIN)
        for r, hurt in records
    ]
    one = EventDecoder(PLAIN)
    expected = []
    for value in values:
        result, _ = timed(lambda value=value: one.decode(value))
        expected.append(outcome(result))
    assert [outcome(item) for item in EventDecoder(PLAIN).decode_batch(values)] == expected

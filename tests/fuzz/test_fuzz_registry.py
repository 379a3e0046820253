"""The decode contract through a registry, with generated writer schemas: our schema's fields
(renamed, reordered, retyped) plus generated fields of any Avro type, and hostile schemas
(arrays of items of no bytes, deep nesting, wrong defaults, negative decimal precision,
renamed records and enums). Records are written with the generated schema, then damaged or
given hostile block counts. Every record is an event or a refusal within the bounds, the
registry is asked once per schema id, and ``decode_batch`` answers what ``decode`` answers."""

from __future__ import annotations

import io
import itertools
import json
import time
from pathlib import Path
from typing import Any

import fastavro
from hypothesis import given
from hypothesis import strategies as st

from service.core.codec import (
    EventDecoder,
    confluent_frame,
    load_reader_schema,
    parse_writer_schema,
)
from tests.fuzz.bounds import assert_contract, fuzz, outcome, peak_memory, timed
from tests.fuzz.test_fuzz_decoder import damaged, events

PLAIN = load_reader_schema(logical_types=False)
OURS: dict[str, Any] = json.loads(
    (Path(__file__).parents[2] / "schemas/segment_membership_change.avsc").read_text()
)
PRIMITIVES = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"]
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True)


@st.composite
def avro_types(draw: st.DrawFn, depth: int, counter: itertools.count[int]) -> Any:
    """An Avro type as JSON; named types get unique names from ``counter``."""
    if depth <= 0:
        return draw(st.sampled_from(PRIMITIVES))
    kind = draw(
        st.sampled_from(
            ["primitive", "primitive", "array", "map", "union", "enum", "fixed", "record"]
        )
    )
    if kind == "primitive":
        return draw(st.sampled_from(PRIMITIVES))
    if kind == "array":
        return {"type": "array", "items": draw(avro_types(depth - 1, counter))}
    if kind == "map":
        return {"type": "map", "values": draw(avro_types(depth - 1, counter))}
    if kind == "enum":
        symbols = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
        return {"type": "enum", "name": f"E{next(counter)}", "symbols": symbols}
    if kind == "fixed":
        return {"type": "fixed", "name": f"F{next(counter)}", "size": draw(st.integers(0, 4))}
    if kind == "record":
        fields = draw(st.lists(avro_types(depth - 1, counter), max_size=3))
        return {
            "type": "record",
            "name": f"R{next(counter)}",
            "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(fields)],
        }
    branches = draw(st.lists(st.sampled_from(PRIMITIVES), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        branches.append(draw(avro_types(depth - 1, counter)))
    return branches


def values_of(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values fastavro can write with ``schema`` (JSON form; ``named`` collects named types)."""
    if isinstance(schema, list):
        return st.one_of(*(values_of(branch, named) for branch in schema))
    if isinstance(schema, str):
        simple: dict[str, st.SearchStrategy[Any]] = {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "float": st.floats(width=32, allow_nan=False),
            "double": st.floats(allow_nan=False),
            "bytes": st.binary(max_size=12),
            "string": st.text(max_size=12),
        }
        return simple[schema] if schema in simple else values_of(named[schema], named)
    kind = schema["type"]
    if kind in ("record", "enum", "fixed"):
        named[schema["name"]] = schema
    if kind == "array":
        return st.lists(values_of(schema["items"], named), max_size=4)
    if kind == "map":
        return st.dictionaries(st.text(max_size=6), values_of(schema["values"], named), max_size=4)
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if kind == "record":
        return st.fixed_dictionaries(
            {f["name"]: values_of(f["type"], named) for f in schema["fields"]}
        )
    return values_of(kind, named)


ZERO_BYTE_ITEMS = [
    "null",
    {"type": "record", "name": "Empty", "fields": []},
    {"type": "fixed", "name": "Nothing", "size": 0},
]


@st.composite
def writer_schemas(draw: st.DrawFn) -> tuple[Any, str | None]:
    """(writer schema JSON, a hostile trait or None)."""
    schema = json.loads(json.dumps(OURS))
    counter = itertools.count()
    trait = draw(
        st.sampled_from(
            [
                None,
                None,
                None,
                "zero-byte-array",
                "deep",
                "wrong-default",
                "negative-precision",
                "renamed-record",
                "renamed-enum",
                "reordered",
                "retyped",
            ]
        )
    )
    for _ in range(draw(st.integers(0, 3))):
        extra = {"name": f"x{next(counter)}", "type": draw(avro_types(3, counter))}
        schema["fields"].insert(draw(st.integers(0, len(schema["fields"]))), extra)
    if trait == "zero-byte-array":
        item = draw(st.sampled_from(ZERO_BYTE_ITEMS))
        schema["fields"].append({"name": "pad", "type": {"type": "array", "items": item}})
    elif trait == "deep":
        depth = draw(st.sampled_from([10, 47, 49, 60, 400]))
        nested: Any = "int"
        for _ in range(depth):
            nested = {"type": "array", "items": nested}
        schema["fields"].append({"name": "deep", "type": nested})
    elif trait == "wrong-default":
        schema["fields"].append({"name": "bad", "type": "int", "default": "zz"})
    elif trait == "negative-precision":
        decimal = {"type": "bytes", "logicalType": "decimal", "precision": -2, "scale": 0}
        schema["fields"].append({"name": "amount", "type": decimal})
    elif trait == "renamed-record":
        schema[draw(st.sampled_from(["name", "namespace"]))] = "Renamed"
    elif trait == "renamed-enum":
        schema["fields"][[f["name"] for f in schema["fields"]].index("action")]["type"]["name"] = (
            "Renamed"
        )
    elif trait == "reordered":
        schema["fields"] = draw(st.permutations(schema["fields"]))
    elif trait == "retyped":
        field = draw(st.sampled_from(["event_id", "email", "occurred_at", "attributes"]))
        index = [f["name"] for f in schema["fields"]].index(field)
        schema["fields"][index]["type"] = draw(
            st.sampled_from(
                ["bytes", "int", ["null", "string"], {"type": "array", "items": "string"}]
            )
        )
    return schema, trait


def zigzag(number: int) -> bytes:
    number = (number << 1) ^ (number >> 63)
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def bodies(data: st.DataObject, schema: Any, trait: str | None) -> list[bytes]:
    """A few records written with ``schema`` (if fastavro can), damaged or hostile ones too."""
    try:
        parsed = fastavro.parse_schema(json.loads(json.dumps(schema)))
    except Exception:
        return [b"", b"\x02a"]  # the schema cannot be parsed: any bytes will do
    named: dict[str, Any] = {}
    fields = {f["name"]: f for f in schema["fields"]}
    record = dict(data.draw(events))
    for name, field in fields.items():
        if name not in record or trait in ("retyped",):
            record[name] = data.draw(values_of(field["type"], named))
    if "pad" in fields:
        record["pad"] = []
    buffer = io.BytesIO()
    try:
        fastavro.schemaless_writer(buffer, parsed, record)
    except Exception:
        return [b"\x02a"]
    body = buffer.getvalue()
    out = [body, damaged(data, body)]
    if trait == "zero-byte-array":  # the pad array is last: its empty block, made hostile
        count = data.draw(st.sampled_from([2**62, 2**30, -(2**40), 5000, 3]))
        block = zigzag(count) + (zigzag(0) if count < 0 else b"")
        out.append(body[:-1] + block + b"\x00")
    return out


class Lookup:
    def __init__(self, text: str) -> None:
        self.text = text
        self.calls = 0

    def __call__(self, schema_id: int) -> Any:
        self.calls += 1
        return parse_writer_schema(self.text)


@fuzz(300)
@given(writer_schemas(), st.data())
def test_generated_writer_schemas_meet_the_contract(
    generated: tuple[Any, str | None], data: st.DataObject
) -> None:
    schema, trait = generated
    text = json.dumps(schema)
    try:
        fastavro.parse_schema(json.loads(text))
        parses = True
    except Exception:
        parses = False
    lookup = Lookup(text)
    decoder = EventDecoder(PLAIN, lookup)
    # The writer schema is fetched, parsed and checked once, in bounded time.
    began = time.perf_counter()
    warm_up = decoder.decode_batch([confluent_frame(1, b"")])[0]
    assert time.perf_counter() - began < 1.0
    if not parses:
        assert outcome(warm_up) == ("poison", "incompatible_schema")
    values = [confluent_frame(1, body) for body in bodies(data, schema, trait)]
    for value in values:
        result, seconds = timed(lambda value=value: decoder.decode(value))
        twin = EventDecoder(PLAIN, Lookup(text))
        twin.decode_batch([confluent_frame(1, b"")])
        memory = peak_memory(lambda value=value, twin=twin: twin.decode(value))
        assert_contract(result, seconds, len(value), memory)
        if not parses:
            assert outcome(result) == ("poison", "incompatible_schema")
    assert [outcome(item) for item in decoder.decode_batch(values)] == [
        outcome(timed(lambda value=value: decoder.decode(value))[0]) for value in values
    ]
    assert lookup.calls == 1


@fuzz(40)
@given(st.integers(min_value=1, max_value=4000), st.sampled_from(["[", '{"type":"array","items":']))
def test_a_schema_nested_to_any_depth_is_answered(depth: int, opener: str) -> None:
    """JSON nested past the recursion limit, or just deep: refused once, never raised."""
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + '"int"' + closer * depth
    text = '{"type":"record","name":"R","fields":[{"name":"n","type":' + nested + "}]}"
    lookup = Lookup(text)
    decoder = EventDecoder(PLAIN, lookup)
    answers = {outcome(item) for item in decoder.decode_batch([confluent_frame(1, b"\x00")] * 20)}
    assert all(isinstance(a, tuple) and a[0] == "poison" for a in answers), answers
    assert lookup.calls == 1
    if depth > 48:
        assert answers == {("poison", "incompatible_schema")}


def test_the_generated_schemas_reach_every_trait_and_the_fast_reader() -> None:
    """Not a property: the generators above do produce what they claim (else the properties
    would pass on nothing)."""
    seen: set[Any] = set()
    fast = 0

    @fuzz(200)
    @given(writer_schemas())
    def collect(generated: tuple[Any, str | None]) -> None:
        nonlocal fast
        schema, trait = generated
        seen.add(trait)
        decoder = EventDecoder(PLAIN, Lookup(json.dumps(schema)))
        decoder.decode_batch([confluent_frame(1, b"")])
        writer = decoder._writers.get(1)
        fast += bool(writer is not None and writer.fast)

    collect()
    assert seen == {
        None,
        "zero-byte-array",
        "deep",
        "wrong-default",
        "negative-precision",
        "renamed-record",
        "renamed-enum",
        "reordered",
        "retyped",
    }
    assert fast > 0

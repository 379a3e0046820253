"""A reader for the one record layout this service owns, about twice as fast as fastavro's.

Why: fastavro reads any schema through a general interpreter (a dict lookup and a file-object
``read`` call per field and per varint byte) into a dict, which ``event_validation.to_event``
then turns into a ``MembershipEvent``: about 3.1 + 1.2 us a record, two thirds of the service's
CPU per consumed record (``benchmarks/cpu.py``). This module reads the bytes of exactly one layout,
``LAYOUT``, by indexing and slicing, and builds the event directly.

Invariant (tested against fastavro with Hypothesis, on valid and on mutated bytes):
``read_event`` returns exactly the event that ``fastavro.schemaless_reader`` followed by
``to_event`` returns for the same bytes, or raises the same ``PoisonMessage`` for an email
``email_of`` refuses, or returns None, meaning "not read here": the caller then decodes with
fastavro, which also names any error. It never returns a different answer. It reads only the
common shape and leaves everything else to fastavro:
- every string, map count and map entry shorter than 64 bytes (a one-byte length);
- unions ``null | string`` with branch index 0 or 1, the enum with index 0 or 1;
- ``occurred_at`` as a plain long of at most 9 bytes, within ``model.OCCURRED_AT_RANGE_MS``;
- at most ``model.MAX_ATTRIBUTES`` attributes;
- the record ends exactly where its bytes end;
- event id, audience id and audience name not blank (``to_event``'s checks, so its reasons
  stay the only ones).
Everything it reads is therefore also within the bounds ``avro_guard.check_record`` enforces
before fastavro reads a record, so declining is the only way it differs from ``decode``.

It is used only when the writer's and reader's schemas both have ``LAYOUT`` (``layout_of``),
names included (a renamed record or enum is left to fastavro, which refuses it as ``decode``
does): with a registry, per writer schema id.
"""

from __future__ import annotations

from collections.abc import Callable
from sys import intern
from typing import Any

from service.core.model import (
    MAX_ATTRIBUTES,
    NO_ATTRIBUTES,
    OCCURRED_AT_MAX_MS,
    OCCURRED_AT_MIN_MS,
    Action,
    MembershipEvent,
)

LayoutType = Any
Layout = tuple[str, tuple[tuple[str, LayoutType], ...]]

# The schema as ``layout_of`` describes it (schemas/segment_membership_change.avsc; ``occurred_at``
# as the long it is on the wire, with or without its ``timestamp-millis``): the record's full
# name and its fields.
LAYOUT: Layout = (
    "com.cdp.audience.SegmentMembershipChange",
    (
        ("event_id", "string"),
        ("occurred_at", "long"),
        ("email", "string"),
        ("audience_id", "string"),
        ("audience_name", "string"),
        ("action", ("enum", "com.cdp.audience.MembershipAction", ("ENTERED", "EXITED"))),
        ("campaign_id", ("union", "null", "string")),
        ("treatment_group", ("union", "null", "string")),
        ("attributes", ("map", "string")),
    ),
)


def layout_of(schema: Any) -> Layout | None:
    """A parsed record schema as (full name, fields as (name, type)), with docs and defaults
    left out (they do not change the bytes); None if it is not a record. Record and enum names
    are kept: schema resolution compares them, so a renamed writer schema is not ours."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return None
    fields = tuple((field["name"], _type_of(field["type"])) for field in schema["fields"])
    return (schema.get("name", ""), fields)


def _type_of(schema: Any) -> LayoutType:
    if isinstance(schema, list):
        return ("union", *(_type_of(branch) for branch in schema))
    if not isinstance(schema, dict):
        return schema  # a primitive, or the name of a named type (then no match)
    kind = schema.get("type")
    if kind == "enum":
        return ("enum", schema.get("name", ""), tuple(schema["symbols"]))
    if kind == "map":
        return ("map", _type_of(schema["values"]))
    if kind == "long" and schema.get("logicalType") == "timestamp-millis":
        # The same bytes: fastavro reads a datetime that ``to_event`` turns back into exactly
        # these milliseconds, so a registered copy of our .avsc is our layout.
        return "long"
    if "logicalType" in schema or kind in ("record", "array", "fixed"):
        return ("other", repr(schema))
    return _type_of(kind)


_ACTION_BY_INDEX = (Action.ENTERED, Action.EXITED)  # the enum's symbols, in LAYOUT's order
_MIN_MS, _MAX_MS = OCCURRED_AT_MIN_MS, OCCURRED_AT_MAX_MS
_new_tuple = tuple.__new__


def read_event(value: bytes, start: int, email_of: Callable[[str], str]) -> MembershipEvent | None:
    """The event in ``value[start:]``, or None (see the module's invariant).

    The common shape is written out field by field, without helper calls (a Python call costs
    as much as reading a field); non-null unions and non-empty maps use the helpers below. A one-byte length ``x`` is the zig-zag encoding of ``x >> 1`` when ``x & 0x81`` is
    0 (below 0x80: one byte; even: not negative). A slice past the end is silently short, so
    every field is followed by an index (``IndexError``) or the final end check.
    """
    try:
        x = value[start]  # event_id
        if x & 0x81:
            return None
        begin = start + 1
        pos = begin + (x >> 1)
        event_id = value[begin:pos].decode()
        x = value[pos]  # occurred_at: a zig-zag varint, low 7 bits first
        pos += 1
        number = x & 0x7F
        shift = 7
        while x & 0x80:
            if shift > 56:  # a tenth byte: fastavro's 64-bit arithmetic decides
                return None
            x = value[pos]
            pos += 1
            number |= (x & 0x7F) << shift
            shift += 7
        occurred = (number >> 1) ^ -(number & 1)
        if not _MIN_MS <= occurred <= _MAX_MS:
            return None  # to_event names it
        x = value[pos]  # email
        if x & 0x81:
            return None
        begin = pos + 1
        pos = begin + (x >> 1)
        raw_email = value[begin:pos].decode()
        x = value[pos]  # audience_id
        if x & 0x81:
            return None
        begin = pos + 1
        pos = begin + (x >> 1)
        # Interned: a few audiences, each named by every pending change (~110 bytes each).
        audience_id = intern(value[begin:pos].decode().strip())
        x = value[pos]  # audience_name
        if x & 0x81:
            return None
        begin = pos + 1
        pos = begin + (x >> 1)
        audience_name = intern(value[begin:pos].decode().strip())
        x = value[pos]  # action: enum index 0 or 1
        if x & 0xFD:
            return None
        action = _ACTION_BY_INDEX[x >> 1]
        pos += 1
        if value[pos] == 0:  # campaign_id and treatment_group: null (the common case)
            campaign_id = None
            pos += 1
        else:
            campaign_id, pos = _union_string(value, pos)
        if value[pos] == 0:
            treatment_group = None
            pos += 1
        else:
            treatment_group, pos = _union_string(value, pos)
        if value[pos] == 0:  # attributes: the empty map (the common case)
            attributes: Any = NO_ATTRIBUTES
            pos += 1
        else:
            attributes, pos = _string_map(value, pos)
        if pos != len(value):
            return None
    except (IndexError, UnicodeDecodeError, _NotHere):
        return None
    if not event_id or event_id.isspace() or not audience_id or not audience_name:
        return None  # to_event names the problem
    return _new_tuple(
        MembershipEvent,
        (
            event_id,
            occurred,
            email_of(raw_email),
            audience_id,
            audience_name,
            action,
            campaign_id,
            treatment_group,
            attributes,
        ),
    )


class _NotHere(Exception):
    """Raised inside the reader's helpers: this record is left to fastavro."""


def _union_string(value: bytes, pos: int) -> tuple[str, int]:
    """A ``null | string`` union at ``pos`` that is not null: (its string, the position after
    it). Any branch index but 1 (encoded 2) is left to fastavro."""
    if value[pos] != 2:
        raise _NotHere
    return _string(value, pos + 1)


def _string(value: bytes, pos: int) -> tuple[str, int]:
    x = value[pos]
    if x & 0x81:
        raise _NotHere
    begin = pos + 1
    end = begin + (x >> 1)
    return value[begin:end].decode(), end


def _string_map(value: bytes, pos: int) -> tuple[dict[str, str], int]:
    """A non-empty map of strings: blocks of entries, ended by a zero count."""
    entries: dict[str, str] = {}
    total = 0  # entries read, a repeated key included (as ``avro_guard`` counts them)
    x = value[pos]
    while x:
        if x & 0x81:  # a negative count (a block with its size) or 64+ entries
            raise _NotHere
        pos += 1
        total += x >> 1
        if total > MAX_ATTRIBUTES:
            raise _NotHere
        for _ in range(x >> 1):
            key, pos = _string(value, pos)
            entries[key], pos = _string(value, pos)
        x = value[pos]
    return entries, pos + 1

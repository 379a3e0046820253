"""Bytes -> ``MembershipEvent``. Pure: the writer schemas come from an injected lookup, the time
from an injected clock.

Two encodings:
- schemaless Avro written with ``schemas/segment_membership_change.avsc`` (the default);
- Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro body) when a schema
  registry is configured. The writer schema comes from the lookup (``adapters/schema_registry``)
  and is resolved against our reader schema, so a producer that adds a field with a default
  does not break us.

The decode contract (tests/unit/test_codec.py, tests/fuzz): every record, valid or hostile, is
decoded or refused, within a bounded time (a few milliseconds, whatever the writer schema) and
bounded memory (a small multiple of its size):
- a writer schema is parsed and checked once per schema id (``avro_guard.compile_writer``);
  what fails is ``incompatible_schema`` for that id, remembered; an id the registry does not
  know is ``unknown_schema``, remembered for ``unknown_ttl`` seconds (one request, not one per
  record);
- each record's bytes are walked against its writer schema before fastavro reads them
  (``avro_guard.check_record``: varints, lengths, enum and union indexes, block counts, at
  most ``MAX_VALUES`` values, ``attributes`` at most ``MAX_ATTRIBUTES`` entries);
- fields are validated (``event_validation.to_event``): text fields not blank, ``occurred_at``
  within ``OCCURRED_AT_RANGE_MS``, the email by the rule in ``model``.

A record that can never be applied raises (or, from ``decode_batch``, is answered with) a
``PoisonMessage`` whose ``reason`` is one of ``REASONS``; the caller parks it in the DLQ. A
record whose writer schema cannot be fetched now is a ``SchemaUnavailable``: never parked, read
again later. During a registry outage the registry is asked at most once per back-off interval
per schema id (exponential, ``backoff_base`` doubling to ``backoff_cap`` seconds), and within one
``decode_batch`` no more ids are asked once one failed.
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any, NamedTuple

import fastavro
from fastavro.read import SchemaResolutionError

from service.core.avro_guard import Program, check_record, compile_writer
from service.core.errors import PoisonMessage, SchemaUnavailable
from service.core.event_validation import EmailCache, to_event
from service.core.fast_decode import LAYOUT, layout_of, read_event
from service.core.model import MAX_ATTRIBUTES, MembershipEvent

SCHEMA_FILE = "segment_membership_change.avsc"
_CONFLUENT_HEADER = struct.Struct(">bI")

# Every reason a ``PoisonMessage`` from this module (and ``event_validation``, ``model``) carries.
REASONS = (
    "undecodable",  # not Avro of its writer schema, or beyond the bounds (avro_guard)
    "bad_magic",  # a registry is configured and the value is not in Confluent wire format
    "unknown_schema",  # the registry does not know the record's schema id
    "incompatible_schema",  # the writer schema cannot be parsed, bounded or resolved against ours
    "missing_field",  # a required text field is blank or absent, or of another type
    "invalid_field",  # occurred_at out of range, more than MAX_ATTRIBUTES attributes
    "invalid_email",  # an email AC would refuse (see model.py)
)
MAX_SCHEMA_CHARS = 1_000_000  # a writer schema's JSON text; ours is 1.6 KB

ParsedSchema = Any
WriterSchemaLookup = Callable[[int], ParsedSchema]
Decoded = MembershipEvent | PoisonMessage | SchemaUnavailable
# What a record's writer schema is checked for: a top-level field's most entries.
_LIMITS = {"attributes": MAX_ATTRIBUTES}


def load_reader_schema(*, logical_types: bool = True) -> ParsedSchema:
    """The project's schema, parsed. Shipped inside the package (a link to ``schemas/``).

    ``logical_types=False`` reads ``occurred_at`` as the plain long it is on the wire: building a
    timezone-aware datetime per record, only to turn it back into milliseconds, costs more than
    the rest of the decode.
    """
    text = resources.files("service").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")
    schema = json.loads(text)
    if not logical_types:
        for item in schema["fields"]:
            if isinstance(item["type"], dict):
                item["type"].pop("logicalType", None)
    return fastavro.parse_schema(schema)


def parse_writer_schema(text: str) -> ParsedSchema:
    """A writer schema's JSON text (as a registry holds it), parsed by fastavro. Anything that
    goes wrong (too long, not JSON, nested past the recursion limit, a default of the wrong
    type, a decimal of negative precision, ...) is ``PoisonMessage("incompatible_schema")``."""
    if not isinstance(text, str):
        raise PoisonMessage("incompatible_schema", "the writer schema is not text")
    if len(text) > MAX_SCHEMA_CHARS:
        raise PoisonMessage(
            "incompatible_schema", f"the writer schema is longer than {MAX_SCHEMA_CHARS} characters"
        )
    try:
        return fastavro.parse_schema(json.loads(text))
    except Exception as exc:  # SchemaParseException, RecursionError, ValueError, KeyError...
        raise PoisonMessage(
            "incompatible_schema",
            f"the writer schema cannot be parsed: {type(exc).__name__}: {str(exc)[:160]}",
        ) from None


def encode_event(event: Mapping[str, Any], schema: ParsedSchema) -> bytes:
    """Schemaless Avro encoding of one event dict (used by the demo, tests and benchmarks)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, dict(event))
    return buffer.getvalue()


def confluent_frame(schema_id: int, body: bytes) -> bytes:
    return _CONFLUENT_HEADER.pack(0, schema_id) + body


class _Writer(NamedTuple):
    """A writer schema ready for use: parsed, its bounds program, and whether ``fast_decode``
    reads its records (same layout and names as the reader's)."""

    schema: ParsedSchema
    program: Program
    fast: bool


class _Waiting(NamedTuple):
    """A schema id the registry could not give: when to ask again, and why."""

    attempts: int
    next_probe: float
    detail: str


class EventDecoder:
    """Decodes and validates record values. Thread-compatible (one thread at a time); keeps the
    writer schemas by id, what the registry refused or could not give, and validated emails.

    ``writer_lookup``: schema id -> parsed writer schema (``parse_writer_schema``); may raise
    ``PoisonMessage`` (``unknown_schema``, ``incompatible_schema``) or ``SchemaUnavailable``;
    anything else it raises counts as ``SchemaUnavailable``. None: values are schemaless Avro
    of the reader schema. ``clock``: seconds, monotonic (back-off and remembered refusals).
    """

    def __init__(
        self,
        reader_schema: ParsedSchema,
        writer_lookup: WriterSchemaLookup | None = None,
        *,
        fast_reader: bool = True,
        clock: Callable[[], float] = time.monotonic,
        backoff_base: float = 1.0,
        backoff_cap: float = 60.0,
        unknown_ttl: float = 300.0,
        max_schema_ids: int = 10_000,
    ) -> None:
        self._reader = reader_schema
        self._writer_lookup = writer_lookup
        self._clock = clock
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._unknown_ttl = unknown_ttl
        self._max_ids = max_schema_ids
        self._email: Callable[[str], str] = EmailCache().__getitem__
        # ``fast_decode`` reads our own layout when writer and reader both have it: always
        # without a registry (the reader's schema is the writer's), per schema id with one.
        # ``fast_reader=False``: fastavro for every record (the benchmark's comparison).
        self._reads_layout = fast_reader and layout_of(reader_schema) == LAYOUT
        self._own = _Writer(
            _millis_as_long(reader_schema),
            compile_writer(reader_schema, _LIMITS),
            self._reads_layout,
        )
        self._writers: dict[int, _Writer] = {}
        self._refused: dict[int, tuple[str, str, float]] = {}  # reason, detail, until
        self._waiting: dict[int, _Waiting] = {}
        self._may_ask = True  # False for the rest of a batch once the registry failed

    def decode(self, value: bytes | None) -> MembershipEvent:
        """One record: the event, or raises ``PoisonMessage`` or ``SchemaUnavailable``."""
        self._may_ask = True
        return self._decode(value)

    def decode_batch(self, values: Sequence[bytes | None]) -> list[Decoded]:
        """Per value, in order: the event, the ``PoisonMessage`` or the ``SchemaUnavailable``
        that ``decode`` raises. Never raises for a bad record or a registry outage.

        Records of our own layout are read by ``fast_decode.read_event``, which gives the same
        answer as ``decode`` or declines; a declined record (an unusual shape, or bad bytes) is
        decoded by ``decode``, through fastavro, which names what is wrong.
        """
        events: list[Decoded] = []
        append, email_of = events.append, self._email
        start = self._fast_start if self._reads_layout else _never
        self._may_ask = True
        for value in values:
            at = start(value) if value else None
            if at is not None:
                try:
                    event = read_event(value, at, email_of)  # type: ignore[arg-type]
                except PoisonMessage as poison:
                    append(poison)
                    continue
                if event is not None:
                    append(event)
                    continue
            try:
                append(self._decode(value))
            except (PoisonMessage, SchemaUnavailable) as failure:
                append(failure)
        return events

    def _fast_start(self, value: bytes) -> int | None:
        """Where ``read_event`` may start reading ``value``; None: decode it with fastavro."""
        if self._writer_lookup is None:
            return 0
        if len(value) <= _CONFLUENT_HEADER.size or value[0] != 0:
            return None
        writer = self._writers.get(_CONFLUENT_HEADER.unpack_from(value)[1])
        if writer is None or not writer.fast:
            return None  # ``decode`` asks the registry first (and may fail clearly)
        return _CONFLUENT_HEADER.size

    def _decode(self, value: bytes | None) -> MembershipEvent:
        if not value:
            raise PoisonMessage("undecodable", "record has no value")
        if self._writer_lookup is None:
            check_record(self._own.program, value, 0)
            record = self._read(value, 0, self._own.schema, None)
        else:
            if len(value) < _CONFLUENT_HEADER.size or value[0] != 0:
                raise PoisonMessage("bad_magic", "value is not in Confluent wire format")
            writer = self._writer(_CONFLUENT_HEADER.unpack_from(value)[1])
            check_record(writer.program, value, _CONFLUENT_HEADER.size)
            record = self._read(value, _CONFLUENT_HEADER.size, writer.schema, self._reader)
        return to_event(record, self._email)

    def _writer(self, schema_id: int) -> _Writer:
        """The checked writer schema of ``schema_id``, or raises what is remembered about it, or
        asks the lookup (when no back-off forbids it)."""
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        now = self._clock()
        refused = self._refused.get(schema_id)
        if refused is not None and now < refused[2]:
            raise PoisonMessage(refused[0], refused[1])
        waiting = self._waiting.get(schema_id)
        if waiting is not None and now < waiting.next_probe:
            raise SchemaUnavailable(schema_id, waiting.detail, waiting.next_probe - now)
        if not self._may_ask:
            raise SchemaUnavailable(
                schema_id,
                "not asked: the registry failed for another record of this batch",
                self._backoff_base,
            )
        assert self._writer_lookup is not None
        try:
            parsed = self._writer_lookup(schema_id)
        except PoisonMessage as poison:
            self._refuse(schema_id, poison, now)
            raise
        except SchemaUnavailable as exc:
            raise self._unavailable(schema_id, exc.detail, exc.retry_after, waiting, now) from None
        except Exception as exc:  # the lookup's own failure: never a reason to park a record
            detail = f"schema lookup failed: {type(exc).__name__}: {str(exc)[:120]}"
            raise self._unavailable(schema_id, detail, 0.0, waiting, now) from None
        try:
            writer = self._compile(parsed)
        except PoisonMessage as poison:
            self._refuse(schema_id, poison, now)
            raise
        except Exception as exc:  # a parsed schema the checks cannot make sense of
            unusable = PoisonMessage(
                "incompatible_schema", f"the writer schema cannot be checked: {type(exc).__name__}"
            )
            self._refuse(schema_id, unusable, now)
            raise unusable from None
        self._waiting.pop(schema_id, None)
        self._refused.pop(schema_id, None)
        _remember(self._writers, schema_id, writer, self._max_ids)
        return writer

    def _compile(self, schema: ParsedSchema) -> _Writer:
        fast = self._reads_layout and layout_of(schema) == LAYOUT
        return _Writer(_millis_as_long(schema), compile_writer(schema, _LIMITS), fast)

    def _refuse(self, schema_id: int, poison: PoisonMessage, now: float) -> None:
        # A schema id's text never changes, so a refused schema stays refused; "not in the
        # registry" is asked again after a while (a registry replica may lag its primary).
        until = now + self._unknown_ttl if poison.reason == "unknown_schema" else math.inf
        self._waiting.pop(schema_id, None)
        _remember(self._refused, schema_id, (poison.reason, poison.detail, until), self._max_ids)

    def _unavailable(
        self, schema_id: int, detail: str, retry_after: float, waiting: _Waiting | None, now: float
    ) -> SchemaUnavailable:
        attempts = waiting.attempts + 1 if waiting is not None else 0
        delay = min(self._backoff_cap, self._backoff_base * 2.0 ** min(attempts, 32))
        if math.isfinite(retry_after):  # the lookup's own hint, within the same cap
            delay = max(delay, min(retry_after, self._backoff_cap))
        _remember(self._waiting, schema_id, _Waiting(attempts, now + delay, detail), self._max_ids)
        self._may_ask = False
        return SchemaUnavailable(schema_id, detail, delay)

    @staticmethod
    def _read(
        value: bytes, start: int, writer: ParsedSchema, reader: ParsedSchema | None
    ) -> dict[str, Any]:
        buffer = io.BytesIO(value)
        if start:
            buffer.seek(start)
        try:
            record = fastavro.schemaless_reader(buffer, writer, reader)
        except SchemaResolutionError as exc:
            raise PoisonMessage("incompatible_schema", str(exc)[:200]) from None
        except Exception as exc:  # fastavro raises many types on garbage input
            raise PoisonMessage("undecodable", f"{type(exc).__name__}: {str(exc)[:120]}") from None
        if buffer.tell() != len(value):
            # Trailing bytes mean the writer used a different schema than we read with.
            raise PoisonMessage("undecodable", "trailing bytes after the Avro record")
        if not isinstance(record, dict):
            raise PoisonMessage("undecodable", "value is not an Avro record")
        return record


def _millis_as_long(schema: ParsedSchema) -> ParsedSchema:
    """``schema`` with a top-level ``occurred_at`` of ``timestamp-millis`` read as the plain long
    of milliseconds it is: fastavro then builds no datetime per record (it cannot for a value
    past year 9999, which would make an out-of-range time ``undecodable`` rather than
    ``invalid_field``), and ``to_event`` gets the milliseconds it wants. Other logical types
    (``timestamp-micros``...) are kept: fastavro's datetime carries their unit."""
    fields = schema.get("fields") if isinstance(schema, dict) else None
    if not isinstance(fields, list):
        return schema
    for index, field in enumerate(fields):
        kind = field.get("type") if isinstance(field, dict) else None
        if (
            field.get("name") == "occurred_at"
            and isinstance(kind, dict)
            and kind.get("type") == "long"
            and kind.get("logicalType") == "timestamp-millis"
        ):
            copied = list(fields)
            copied[index] = {**field, "type": "long"}
            return {**schema, "fields": copied}
    return schema


def _remember(table: dict[int, Any], key: int, value: Any, most: int) -> None:
    """``table[key] = value``, the table cleared first when it holds ``most`` entries (what is
    forgotten is asked or computed again: slower, never wrong)."""
    if len(table) >= most and key not in table:
        table.clear()
    table[key] = value


def _never(value: bytes) -> int | None:
    return None

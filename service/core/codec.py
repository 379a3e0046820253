"""Bytes -> ``MembershipEvent``. Pure apart from the optional schema-registry lookup.

Two encodings:
- schemaless Avro written with ``schemas/segment_membership_change.avsc`` (the default);
- Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro body) when a schema
  registry is configured. The writer schema comes from the registry and is resolved against our
  reader schema, so a producer that adds a field with a default does not break us.

Every failure that retrying cannot fix is a ``PoisonMessage`` with an enumerated ``reason``:
``undecodable``, ``bad_magic``, ``unknown_schema``, ``incompatible_schema``, ``missing_field``,
``invalid_email``. The caller parks those in the DLQ.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError

from service.core.errors import PoisonMessage
from service.core.fast_decode import LAYOUT, layout_of, read_event
from service.core.model import (
    MAX_EMAIL_LENGTH,
    NO_ATTRIBUTES,
    Action,
    MembershipEvent,
    checked_email,
    normalise_email,
    validated_email,
)

SCHEMA_FILE = "segment_membership_change.avsc"
_CONFLUENT_HEADER = struct.Struct(">bI")

ParsedSchema = Any
WriterSchemaLookup = Callable[[int], ParsedSchema]


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


def encode_event(event: Mapping[str, Any], schema: ParsedSchema) -> bytes:
    """Schemaless Avro encoding of one event dict (used by the demo, tests and benchmarks)."""
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, schema, dict(event))
    return buffer.getvalue()


def confluent_frame(schema_id: int, body: bytes) -> bytes:
    return _CONFLUENT_HEADER.pack(0, schema_id) + body


class EventDecoder:
    """Decodes and validates record values. Thread-compatible; keeps a writer-schema cache and a
    cache of validated emails."""

    def __init__(
        self,
        reader_schema: ParsedSchema,
        writer_lookup: WriterSchemaLookup | None = None,
        *,
        fast_reader: bool = True,
    ) -> None:
        self._reader = reader_schema
        self._writer_lookup = writer_lookup
        self._writers: dict[int, ParsedSchema] = {}
        self._email: Callable[[str], str] = EmailCache().__getitem__
        # ``fast_decode`` reads our own layout when writer and reader both have it: always
        # without a registry (the reader's schema is the writer's), per schema id with one.
        # ``fast_reader=False``: fastavro for every record (the benchmark's comparison).
        self._reads_layout = fast_reader and layout_of(reader_schema) == LAYOUT
        self._fast_ids: dict[int, bool] = {}

    def decode(self, value: bytes | None) -> MembershipEvent:
        if not value:
            raise PoisonMessage("undecodable", "record has no value")
        if self._writer_lookup is None:
            record = self._read(value, 0, self._reader, None)
        else:
            if len(value) < _CONFLUENT_HEADER.size or value[0] != 0:
                raise PoisonMessage("bad_magic", "value is not in Confluent wire format")
            _, schema_id = _CONFLUENT_HEADER.unpack_from(value)
            writer = self._writer_schema(schema_id)
            record = self._read(value, _CONFLUENT_HEADER.size, writer, self._reader)
        return to_event(record, self._email)

    def decode_batch(self, values: Sequence[bytes | None]) -> list[MembershipEvent | PoisonMessage]:
        """``decode`` of each value, in order: the event, or the ``PoisonMessage`` it raises.

        Records of our own layout are read by ``fast_decode.read_event``, which gives the same
        answer as ``decode`` or declines; a declined record (an unusual shape, or bad bytes) is
        decoded by ``decode``, through fastavro, which names what is wrong.
        """
        events: list[MembershipEvent | PoisonMessage] = []
        append, email_of = events.append, self._email
        start = self._fast_start if self._reads_layout else _never
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
            append(self._decode_or_poison(value))
        return events

    def _fast_start(self, value: bytes) -> int | None:
        """Where ``read_event`` may start reading ``value``; None: decode it with fastavro."""
        if self._writer_lookup is None:
            return 0
        if len(value) <= _CONFLUENT_HEADER.size or value[0] != 0:
            return None
        _, schema_id = _CONFLUENT_HEADER.unpack_from(value)
        fast = self._fast_ids.get(schema_id)
        if fast is None:
            writer = self._writers.get(schema_id)
            if writer is None:
                return None  # ``decode`` asks the registry first (and may fail clearly)
            fast = self._fast_ids[schema_id] = layout_of(writer) == LAYOUT
        return _CONFLUENT_HEADER.size if fast else None

    def _decode_or_poison(self, value: bytes | None) -> MembershipEvent | PoisonMessage:
        try:
            return self.decode(value)
        except PoisonMessage as poison:
            return poison

    def _writer_schema(self, schema_id: int) -> ParsedSchema:
        cached = self._writers.get(schema_id)
        if cached is None:
            assert self._writer_lookup is not None
            cached = self._writer_lookup(schema_id)
            self._writers[schema_id] = cached
        return cached

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


_ACTIONS = {a.value: a for a in Action}  # a dict lookup: Enum's __call__ is slow per record
_TEXT_FIELDS = ("event_id", "audience_id", "audience_name")


# A spelling longer than this is never kept as a key (a valid email is at most 254 characters;
# the rest would be padding someone else chose).
MAX_SPELLING = MAX_EMAIL_LENGTH + 64
_ENTRY_BYTES = 112  # a key's str header and its dict slot, about (the key's characters on top)


class EmailCache(dict[str, str]):
    """Spelling -> normalised valid email, remembered: a CDP re-scores the same people over and
    over, and the regex is a tenth of the per-record cost. A dict whose ``__missing__``
    validates, so a hit (``cache[raw]``) runs no Python code at all.

    Keyed by the normalised email, so the regex runs once per address whatever its spellings;
    a spelling (case, surrounding spaces) is a key too when it is at most ``MAX_SPELLING``
    characters, so a record with a megabyte of padding keeps nothing of its padding. Bounded by
    bytes: the keys' characters plus ``_ENTRY_BYTES`` each stay under ``max_bytes``; cleared
    when full (a re-validation is only slower, never wrong). Invalid emails are not kept; they
    are rare and each raises ``PoisonMessage`` again."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.used = 0

    def __missing__(self, raw: str) -> str:
        # Runs for every first sighting of a spelling (a quarter of the benchmark's records):
        # written out, without helper calls.
        email = normalise_email(raw)
        found = self.get(email)
        cost = 0
        if found is None:
            found = checked_email(email)  # raises for an invalid one: nothing kept
            cost = len(found) + _ENTRY_BYTES
        spelled = raw != found and len(raw) <= MAX_SPELLING
        if spelled:
            cost += len(raw) + _ENTRY_BYTES
        if self.used + cost > self.max_bytes:
            self.clear()
            self.used = 0
            cost = len(found) + _ENTRY_BYTES + (len(raw) + _ENTRY_BYTES if spelled else 0)
        self[found] = found
        if spelled:
            self[raw] = found
        self.used += cost
        return found

    def __call__(self, raw: str) -> str:
        return self[raw]


def to_event(
    record: Mapping[str, Any], email_of: Callable[[str], str] = validated_email
) -> MembershipEvent:
    """Validate a decoded record dict into an event (the email normalised by ``email_of``).

    Runs once per consumed record, so the common case is written for speed: every field read by
    index (a record read with our schema has them all), exact type checks, positional
    construction. Anything unusual goes to ``_checked_event``, which names what is wrong.
    """
    try:
        event_id = record["event_id"]
        occurred = record["occurred_at"]
        raw_email = record["email"]
        audience_id = record["audience_id"].strip()
        audience_name = record["audience_name"].strip()
        action = _ACTIONS[record["action"]]
        campaign_id = record["campaign_id"]
        treatment_group = record["treatment_group"]
        attributes = record["attributes"]
    except (KeyError, TypeError, AttributeError):
        return _checked_event(record, email_of)
    if (
        type(event_id) is not str
        or type(raw_email) is not str
        or type(occurred) is not int
        or type(audience_id) is not str
        or type(audience_name) is not str
        or not event_id
        or event_id.isspace()
        or not audience_id
        or not audience_name
    ):
        return _checked_event(record, email_of)
    # tuple.__new__ directly: the named tuple's own __new__ is a Python function per record.
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
            attributes or NO_ATTRIBUTES,
        ),
    )


_new_tuple = tuple.__new__


def _never(value: bytes) -> int | None:
    return None


def _checked_event(record: Mapping[str, Any], email_of: Callable[[str], str]) -> MembershipEvent:
    """``to_event`` for records off the common path: each field checked, a clear reason."""
    for name in _TEXT_FIELDS:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise PoisonMessage("missing_field", f"{name} is empty")
    raw_email = record.get("email")
    if not isinstance(raw_email, str):
        raise PoisonMessage("missing_field", "email is missing")
    occurred = record.get("occurred_at")
    if isinstance(occurred, datetime):
        occurred = int(occurred.timestamp() * 1000)
    elif not isinstance(occurred, int) or isinstance(occurred, bool):
        raise PoisonMessage("missing_field", "occurred_at is missing")
    action = record.get("action")
    if not isinstance(action, str) or action not in _ACTIONS:
        raise PoisonMessage("missing_field", "action is not ENTERED or EXITED")
    return MembershipEvent(
        str(record["event_id"]),
        int(occurred),
        email_of(str(raw_email)),
        str(record["audience_id"]).strip(),
        str(record["audience_name"]).strip(),
        _ACTIONS[action],
        record.get("campaign_id"),
        record.get("treatment_group"),
        record.get("attributes") or NO_ATTRIBUTES,
    )


class SchemaRegistryClient:
    """Fetches writer schemas by id from a Confluent-compatible registry (``GET /schemas/ids/N``).

    An unknown id (404) is a ``PoisonMessage``; a registry that cannot be reached raises
    ``RegistryUnavailable`` so the runner retries instead of dead-lettering good records.
    """

    def __init__(self, base_url: str, http_get: Callable[[str], tuple[int, bytes]]) -> None:
        self._base = base_url.rstrip("/")
        self._get = http_get

    def __call__(self, schema_id: int) -> ParsedSchema:
        status, body = self._get(f"{self._base}/schemas/ids/{schema_id}")
        if status == 404:
            raise PoisonMessage("unknown_schema", f"schema id {schema_id} is not in the registry")
        if status != 200:
            raise RegistryUnavailable(f"schema registry answered {status} for id {schema_id}")
        try:
            schema_text = json.loads(body)["schema"]
            return fastavro.parse_schema(json.loads(schema_text))
        except (ValueError, KeyError, TypeError) as exc:
            raise PoisonMessage(
                "unknown_schema", f"schema id {schema_id} unusable: {exc}"
            ) from None


class RegistryUnavailable(Exception):
    """The schema registry could not be asked; retry the record later."""

"""An independent, strict reader of our own record layout (schemaless), written from the Avro
specification for the fuzz properties' oracle: what it refuses, the decoder must refuse; what it
reads, the decoder must read the same. Slow and plain on purpose."""

from __future__ import annotations

import contextlib
from typing import Any

from service.core.errors import PoisonMessage
from service.core.event_validation import to_event
from service.core.model import MAX_ATTRIBUTES, validated_email


class Invalid(Exception):
    """Not a valid Avro encoding of our schema."""


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.numbers: list[tuple[int, int]] = []  # (start, end) of every varint read

    def long(self) -> int:
        """A zig-zag varint: at most 10 bytes, at most 64 bits."""
        start = self.pos
        value = self._long()
        self.numbers.append((start, self.pos))
        return value

    def _long(self) -> int:
        result = 0
        for index in range(10):
            if self.pos >= len(self.data):
                raise Invalid("ends inside a number")
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << (7 * index)
            if byte < 0x80:
                if result >= 2**64:
                    raise Invalid("more than 64 bits")
                return (result >> 1) ^ -(result & 1)
        raise Invalid("more than 10 bytes")

    def string(self) -> bytes:
        """A string's bytes (UTF-8 is checked once the whole record is known to be well formed:
        the decoder checks the structure before fastavro decodes any text)."""
        size = self.long()
        if size < 0 or self.pos + size > len(self.data):
            raise Invalid("bad length")
        raw = self.data[self.pos : self.pos + size]
        self.pos += size
        return raw

    def index(self, choices: int) -> int:
        value = self.long()
        if not 0 <= value < choices:
            raise Invalid("index out of range")
        return value

    def optional_string(self) -> bytes | None:
        return None if self.index(2) == 0 else self.string()

    def attributes(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        total = 0
        while True:
            count = self.long()
            if count == 0:
                return out
            end = None
            if count < 0:
                count = -count
                size = self.long()
                if size < 0 or self.pos + size > len(self.data):
                    raise Invalid("bad block size")
                end = self.pos + size
            total += count
            if total > MAX_ATTRIBUTES:
                raise TooMany
            for _ in range(count):
                key = self.string()
                out.append((key, self.string()))
            if end is not None and self.pos != end:
                raise Invalid("block size does not match")


class TooMany(Exception):
    """More attributes than the contract allows."""


def numbers_in(value: bytes) -> list[tuple[int, int]]:
    """Where the varints of a valid record are (lengths, the time, indexes, counts): the places
    where a hostile number does harm."""
    reader = Reader(value)
    with contextlib.suppress(Invalid, TooMany):
        read(reader)
    return reader.numbers


def read(reader: Reader) -> dict[str, Any]:
    return {
        "event_id": reader.string(),
        "occurred_at": reader.long(),
        "email": reader.string(),
        "audience_id": reader.string(),
        "audience_name": reader.string(),
        "action": ("ENTERED", "EXITED")[reader.index(2)],
        "campaign_id": reader.optional_string(),
        "treatment_group": reader.optional_string(),
        "attributes": reader.attributes(),
    }


def expected(value: bytes | None) -> Any:
    """The decode contract's answer for a schemaless record: the event, or ("poison", reason)."""
    if not value:
        return ("poison", "undecodable")
    reader = Reader(value)
    try:
        record = read(reader)
        if reader.pos != len(value):
            raise Invalid("trailing bytes")
    except Invalid:
        return ("poison", "undecodable")
    except TooMany:
        return ("poison", "invalid_field")
    try:
        record = {k: text(v) for k, v in record.items()}
    except UnicodeDecodeError:
        return ("poison", "undecodable")
    try:
        return to_event(record, validated_email)
    except PoisonMessage as poison:
        return ("poison", poison.reason)


def text(value: Any) -> Any:
    """Bytes read as strings decoded (strictly), in the same shapes; other values as they are."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, list):
        return {text(k): text(v) for k, v in value}
    return value

"""The ledger's Avro record: ``LedgerCodec`` turns a ``LedgerEntry`` into the value written to
the ledger topic, and such a value back into the entry. Pure (it reads only the schema files
shipped in the package). ``service/core/ledger.py`` holds the record types;
``service/adapters/ledger_store.py`` writes and reads the topic.

Invariants:
- version 2 records are written: ``FORMAT_V2``, then schemaless Avro of
  ``schemas/ledger_entry.avsc``; version 1 records (no prefix, ``ledger_entry.v1.avsc``) are
  still read, with ``verified`` false and no list id;
- ``decode`` raises ``ValueError`` for a value that is neither version, that has trailing
  bytes, or whose status or ``pending`` the in-memory form cannot hold (a corrupt or foreign
  record is refused rather than crashing every restore).
"""

from __future__ import annotations

import io
import json
from importlib import resources
from typing import Any

import fastavro

from service.core.ledger import PENDING_IMPORT, LedgerEntry, ListState, SetBy

LEDGER_SCHEMA_FILE = "ledger_entry.avsc"
LEDGER_V1_SCHEMA_FILE = "ledger_entry.v1.avsc"
# A version-2 value starts with these bytes. A version-1 value cannot: its first byte is the
# contact id's union index as a zigzag varint, 0x00 or 0x02.
FORMAT_V2 = b"\xff\x02"

_PENDING_VALUES = frozenset(bits + via for bits in range(4) for via in (0, PENDING_IMPORT))


def load_ledger_schema(name: str = LEDGER_SCHEMA_FILE) -> Any:
    text = resources.files("service").joinpath("schemas", name).read_text("utf-8")
    schema = json.loads(text)
    for item in schema["fields"][2]["type"]["items"]["fields"]:
        if isinstance(item["type"], dict):
            item["type"].pop("logicalType", None)  # plain longs: milliseconds, as stored
    return fastavro.parse_schema(schema)


class LedgerCodec:
    """Version 2 records are written (``FORMAT_V2`` + Avro); version 1 records (no prefix) are
    still read, with ``verified`` false and no list id."""

    def __init__(self) -> None:
        self.schema = load_ledger_schema()
        self.schema_v1 = load_ledger_schema(LEDGER_V1_SCHEMA_FILE)

    def encode(self, entry: LedgerEntry) -> bytes:
        record = {
            "contact_id": entry.contact_id,
            "fields_hash": entry.fields_hash,
            "lists": [
                {
                    "list": s.list,
                    "status": s.status,
                    "set_by": s.set_by.name,
                    "event_id": s.event_id,
                    "event_time": s.event_time_ms,
                    "applied_at": s.applied_at_ms,
                    "source_partition": s.source_partition,
                    "source_offset": s.source_offset,
                    "audience_id": s.audience_id,
                    "audience_name": s.audience_name,
                    "campaign_id": s.campaign_id,
                    "treatment_group": s.treatment_group,
                    "verified": s.verified,
                    "list_id": s.list_id,
                    "pending": s.pending,
                    "pending_since": s.pending_since_ms,
                }
                for s in entry.lists
            ],
        }
        out = io.BytesIO()
        out.write(FORMAT_V2)
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, data: bytes) -> LedgerEntry:
        """``ValueError`` for a value that is neither version."""
        try:
            if data.startswith(FORMAT_V2):
                buffer = io.BytesIO(data)
                buffer.seek(len(FORMAT_V2))
                record: Any = fastavro.schemaless_reader(buffer, self.schema, None)
            else:
                buffer = io.BytesIO(data)
                record = fastavro.schemaless_reader(buffer, self.schema_v1, None)
        except Exception as exc:  # fastavro raises many types on garbage
            raise ValueError(f"not a ledger record: {type(exc).__name__}") from None
        if buffer.tell() != len(data):
            raise ValueError("not a ledger record: trailing bytes")
        for item in record["lists"]:
            # What the index packs in a byte each: anything else is not a record of ours (a
            # corrupt or foreign one), refused here rather than crashing every restore.
            if item["status"] not in (0, 1, 2):
                raise ValueError(f"not a ledger record: status {item['status']} out of range")
            if item.get("pending", 0) not in _PENDING_VALUES:
                raise ValueError(f"not a ledger record: pending {item['pending']} out of range")
        return LedgerEntry(
            record["contact_id"],
            int(record["fields_hash"]),
            tuple(
                ListState(
                    item["list"],
                    int(item["status"]),
                    SetBy[item["set_by"]],
                    item["event_id"],
                    int(item["event_time"]),
                    int(item["applied_at"]),
                    int(item["source_partition"]),
                    int(item["source_offset"]),
                    item["audience_id"],
                    item["audience_name"],
                    item["campaign_id"],
                    item["treatment_group"],
                    bool(item.get("verified", False)),
                    item.get("list_id"),
                    int(item.get("pending", 0)),
                    int(item.get("pending_since", 0)),
                )
                for item in record["lists"]
            ),
        )

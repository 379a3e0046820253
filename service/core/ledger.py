"""The applied-state ledger: what this service last set in ActiveCampaign, per email and list.

Pure parts (no I/O): the record types, ``plan_change`` (what a change needs, given what the
ledger holds), ``merged`` (the next entry after an outcome), the Avro codec and ``CompactIndex``
(the in-memory form). ``service/adapters/ledger_store.py`` is the Kafka shell around them.

Invariants:
- a ledger entry is written only after AC confirmed every list state it records, and the source
  offsets of those changes complete only on the broker's ack of the write;
- ``set_by`` SERVICE on status 2 means *this service* unsubscribed the contact: only then may an
  ENTERED set status 1 again through ``contactLists``. A status 2 set by anyone else (PERSON) or
  of unknown origin (UNKNOWN) is never overridden;
- a change is skipped only when the ledger already holds its target state, holds the state of
  a later record of the same partition (offset *and* event time both later: a replay), or is an
  exit for a contact the ledger has no subscription of ours for (nothing of ours to undo).
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import struct
import uuid
from collections.abc import Mapping
from importlib import resources
from typing import Any, NamedTuple

import fastavro

from service.core.model import Action

LEDGER_SCHEMA_FILE = "ledger_entry.avsc"


class SetBy(enum.IntEnum):
    SERVICE = 0
    PERSON = 1
    UNKNOWN = 2


class ListState(NamedTuple):
    """One list's state for one email, with the event that set it."""

    list: str
    status: int  # 1 subscribed, 2 unsubscribed
    set_by: SetBy
    event_id: str
    event_time_ms: int
    applied_at_ms: int
    source_partition: int
    source_offset: int
    audience_id: str
    audience_name: str
    campaign_id: str | None = None
    treatment_group: str | None = None


class LedgerEntry(NamedTuple):
    contact_id: str | None
    fields_hash: int
    lists: tuple[ListState, ...]

    def state(self, list_label: str) -> ListState | None:
        for item in self.lists:
            if item.list == list_label:
                return item
        return None


class Plan(enum.Enum):
    """What one change needs from AC, decided from the ledger."""

    SKIP = "skip"  # the ledger already holds this state (or a later one): no request
    CONSENT_KEPT = "consent_kept"  # ENTERED, but the person opted out: no request, record it
    SET = "set"  # write the status (per contact or in an import)
    RESUBSCRIBE = "resubscribe"  # ENTERED after our own unsubscribe: contactLists status 1
    FIRST_ENTRY = (
        "first_entry"  # ENTERED, no trusted state: subscribe without overriding an opt-out
    )


def plan_change(
    state: ListState | None, action: Action, partition: int, offset: int, event_time_ms: int
) -> Plan:
    """The decision table (pure). ``offset`` is the change's last source offset."""
    if state is None:
        # An exit for a contact this service never subscribed: nothing of ours to undo. Writing a
        # status 2 here would make it look like ours, and a later entry would then override an
        # opt-out the person may have made before we ever saw them.
        return Plan.FIRST_ENTRY if action is Action.ENTERED else Plan.SKIP
    if (
        state.source_partition == partition
        and offset <= state.source_offset
        and event_time_ms <= state.event_time_ms
    ):
        return Plan.SKIP  # a replay: the ledger holds what a later record of this partition set
    if action is Action.ENTERED:
        if state.status == 1:
            return Plan.SKIP
        if state.set_by is SetBy.SERVICE:
            return Plan.RESUBSCRIBE
        if state.set_by is SetBy.PERSON:
            return Plan.CONSENT_KEPT
        return Plan.FIRST_ENTRY
    return Plan.SKIP if state.status == 2 else Plan.SET


def set_by_after(
    plan: Plan, action: Action, previous: ListState | None, consent_kept: bool
) -> SetBy:
    """Who the recorded status belongs to after a change was applied (or kept)."""
    if consent_kept:
        return SetBy.PERSON
    if action is Action.ENTERED:
        return SetBy.SERVICE
    if previous is not None and previous.status == 1:
        return SetBy.SERVICE  # we subscribed them and now unsubscribe them: ours to reverse
    if previous is not None:
        return previous.set_by
    return SetBy.UNKNOWN  # an exit for a contact we never subscribed: not ours to reverse


def merged(
    entry: LedgerEntry | None,
    states: list[ListState],
    contact_id: str | None,
    fields_hash: int | None,
) -> LedgerEntry:
    """``entry`` with ``states`` replacing the states of their lists."""
    lists = {s.list: s for s in (entry.lists if entry else ())}
    for state in states:
        lists[state.list] = state
    return LedgerEntry(
        contact_id or (entry.contact_id if entry else None),
        fields_hash if fields_hash is not None else (entry.fields_hash if entry else 0),
        tuple(lists.values()),
    )


def fields_hash(standard: Mapping[str, str], custom: Mapping[str, str]) -> int:
    """A stable 63-bit hash of the mapped fields (0 means none). Stable across processes,
    unlike ``hash()``, because it is stored."""
    if not standard and not custom:
        return 0
    text = json.dumps([sorted(standard.items()), sorted(custom.items())])
    value = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1
    return value or 1


# ---- the Avro record ---------------------------------------------------------------------


def load_ledger_schema() -> Any:
    text = resources.files("service").joinpath("schemas", LEDGER_SCHEMA_FILE).read_text("utf-8")
    schema = json.loads(text)
    for item in schema["fields"][2]["type"]["items"]["fields"]:
        if isinstance(item["type"], dict):
            item["type"].pop("logicalType", None)  # plain longs: milliseconds, as stored
    return fastavro.parse_schema(schema)


class LedgerCodec:
    def __init__(self) -> None:
        self.schema = load_ledger_schema()

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
                }
                for s in entry.lists
            ],
        }
        out = io.BytesIO()
        fastavro.schemaless_writer(out, self.schema, record)
        return out.getvalue()

    def decode(self, data: bytes) -> LedgerEntry:
        record: Any = fastavro.schemaless_reader(io.BytesIO(data), self.schema, None)
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
                )
                for item in record["lists"]
            ),
        )


# ---- the in-memory form --------------------------------------------------------------------

_HEADER = struct.Struct(">QqB")  # contact id (0: unknown), fields hash, number of lists
# list index, status*4+set_by, context index, event ms, applied ms, partition, offset, id length
_LIST = struct.Struct(">IBIqqiqH")
_UUID_MARK = 0xFFFF


class CompactIndex:
    """email -> packed bytes, per partition. Measured (``make bench-ledger``): about 220 bytes
    per email with 1.3 lists, key and dict slot included, instead of ~1 KB of Python objects:
    list labels and (audience, campaign, treatment group) tuples are interned in tables shared
    by all partitions, a UUID event id is kept as its 16 bytes, a numeric contact id as an
    integer."""

    def __init__(self) -> None:
        self.partitions: dict[int, dict[str, bytes]] = {}
        self._labels: list[str] = []
        self._label_ids: dict[str, int] = {}
        self._contexts: list[tuple[str, str, str | None, str | None]] = []
        self._context_ids: dict[tuple[str, str, str | None, str | None], int] = {}

    def __len__(self) -> int:
        return sum(len(p) for p in self.partitions.values())

    def get(self, partition: int, email: str) -> LedgerEntry | None:
        packed = self.partitions.get(partition, {}).get(email)
        return None if packed is None else self.unpack(packed)

    def put(self, partition: int, email: str, entry: LedgerEntry) -> None:
        self.partitions.setdefault(partition, {})[email] = self.pack(entry)

    def replace(self, partition: int, emails: dict[str, bytes]) -> None:
        self.partitions[partition] = emails

    def forget(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.partitions.pop(partition, None)

    def _intern_label(self, label: str) -> int:
        index = self._label_ids.get(label)
        if index is None:
            index = self._label_ids[label] = len(self._labels)
            self._labels.append(label)
        return index

    def _intern_context(self, context: tuple[str, str, str | None, str | None]) -> int:
        index = self._context_ids.get(context)
        if index is None:
            index = self._context_ids[context] = len(self._contexts)
            self._contexts.append(context)
        return index

    def pack(self, entry: LedgerEntry) -> bytes:
        cid = entry.contact_id
        numeric = cid is not None and cid.isdigit() and int(cid) < 2**64
        parts = [
            _HEADER.pack(int(cid) if numeric and cid else 0, entry.fields_hash, len(entry.lists))
        ]
        for s in entry.lists:
            event_id = _event_id_bytes(s.event_id)
            parts.append(
                _LIST.pack(
                    self._intern_label(s.list),
                    s.status * 4 + int(s.set_by),
                    self._intern_context(
                        (s.audience_id, s.audience_name, s.campaign_id, s.treatment_group)
                    ),
                    s.event_time_ms,
                    s.applied_at_ms,
                    s.source_partition,
                    s.source_offset,
                    _UUID_MARK if event_id[0] else len(event_id[1]),
                )
            )
            parts.append(event_id[1])
        return b"".join(parts)

    def unpack(self, packed: bytes) -> LedgerEntry:
        contact, fhash, count = _HEADER.unpack_from(packed, 0)
        pos = _HEADER.size
        lists = []
        for _ in range(count):
            label, code, context, event_ms, applied_ms, partition, offset, id_len = (
                _LIST.unpack_from(packed, pos)
            )
            pos += _LIST.size
            if id_len == _UUID_MARK:
                event_id = str(uuid.UUID(bytes=packed[pos : pos + 16]))
                pos += 16
            else:
                event_id = packed[pos : pos + id_len].decode()
                pos += id_len
            audience_id, audience_name, campaign, group = self._contexts[context]
            lists.append(
                ListState(
                    self._labels[label],
                    code // 4,
                    SetBy(code % 4),
                    event_id,
                    event_ms,
                    applied_ms,
                    partition,
                    offset,
                    audience_id,
                    audience_name,
                    campaign,
                    group,
                )
            )
        return LedgerEntry(str(contact) if contact else None, fhash, tuple(lists))


def _event_id_bytes(event_id: str) -> tuple[bool, bytes]:
    """(is a canonical UUID, bytes): a UUID takes 16 bytes instead of 36."""
    if len(event_id) == 36:
        try:
            parsed = uuid.UUID(event_id)
        except ValueError:
            parsed = None
        if parsed is not None and str(parsed) == event_id:
            return True, parsed.bytes
    raw = event_id.encode()
    if len(raw) >= _UUID_MARK:
        raise ValueError("event id longer than 65534 bytes")
    return False, raw

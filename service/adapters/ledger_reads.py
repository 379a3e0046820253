"""The ledger read whole, for the operator's commands (``explain``, ``reconcile``): no index, no
writes; each partition read from its beginning to its end by a ``LogReader`` of its own
(``kafka_log_reader`` in production).

Invariant: an email's entry is the one restore would build (``ledger.newest`` over its records
in log order: per list the state of the latest source record); a tombstone drops what came
before it; a record that does not decode is skipped (``read_list`` drops the email then, as for
a record without the list). Keys that are not emails (the import budget, import intents) are
never returned.
"""

from __future__ import annotations

from collections.abc import Callable

from service.adapters.kafka import LogReaderFactory
from service.adapters.ledger_store import RESTORE_BATCH
from service.core.ledger import LedgerEntry, newest
from service.core.ledger_codec import LedgerCodec


def read_all(
    readers: LogReaderFactory,
    topic: str,
    partitions: list[int],
    progress: Callable[[int], None] = lambda records: None,
) -> dict[str, LedgerEntry]:
    """Every email's entry (merged as restore merges): for ``explain``/``reconcile``."""
    codec = LedgerCodec()
    entries: dict[str, LedgerEntry] = {}
    reader = readers(topic, partitions)
    records = 0
    try:
        while not reader.done():
            for _partition, key_bytes, value in reader.read(RESTORE_BATCH, 0.1):
                records += 1
                key = key_bytes.decode("utf-8", "replace")
                if "@" not in key:
                    continue
                if value is None:
                    entries.pop(key, None)
                    continue
                try:
                    entry = codec.decode(value)
                except ValueError:
                    continue
                entries[key] = newest(entries.get(key), entry)
            progress(records)
    finally:
        reader.close()
    return entries


def read_entry(
    readers: LogReaderFactory, topic: str, partitions: list[int], email: str
) -> LedgerEntry | None:
    """One email's entry."""
    codec = LedgerCodec()
    found: LedgerEntry | None = None
    reader = readers(topic, partitions)
    wanted = email.encode()
    try:
        while not reader.done():
            for _partition, key, value in reader.read(RESTORE_BATCH, 0.1):
                if key != wanted:
                    continue
                if value is None:
                    found = None
                    continue
                try:
                    found = newest(found, codec.decode(value))
                except ValueError:
                    continue
    finally:
        reader.close()
    return found


def read_list(
    readers: LogReaderFactory, topic: str, partitions: list[int], label: str
) -> dict[str, LedgerEntry]:
    """Every email's entry cut down to one list (for ``reconcile``): memory grows with that
    list's members, not with the whole ledger."""
    codec = LedgerCodec()
    found: dict[str, LedgerEntry] = {}
    reader = readers(topic, partitions)
    try:
        while not reader.done():
            for _partition, key_bytes, value in reader.read(RESTORE_BATCH, 0.1):
                email = key_bytes.decode("utf-8", "replace")
                if "@" not in email:
                    continue
                state = None
                if value is not None:
                    try:
                        state = codec.decode(value).state(label)
                    except ValueError:
                        state = None
                if state is None:
                    found.pop(email, None)  # a later record without the list (or a tombstone)
                    continue
                current = found.get(email)
                candidate = LedgerEntry(None, 0, (state,))
                found[email] = newest(current, candidate)
    finally:
        reader.close()
    return found

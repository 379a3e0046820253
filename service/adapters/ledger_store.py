"""The ledger's Kafka shell: restore partitions into ``CompactIndex``, write entries, read them
for ``explain`` and ``reconcile``.

Topic: compacted, one partition per source partition; a ledger record goes to the partition of
the source record that produced it, so the replica that owns a source partition owns its ledger.
Restore reads an assigned partition from the beginning to its end (the end-of-partition event,
whose position comes from the fetch responses) before any change of that partition is applied.
A write's callback runs only on the broker's ack; a failed delivery is retried, never dropped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from service.adapters.dlq import produce_when_room
from service.core.ledger import CompactIndex, LedgerCodec, LedgerEntry

logger = logging.getLogger(__name__)

RESTORE_BATCH = 5000

# The key of a partition's import-budget history (``ImportBudget.history``): not an email (no
# "@"), so it never collides with an entry, and compaction keeps only the latest.
BUDGET_KEY = "import-budget"


def encode_budget(charges: list[tuple[float, float]]) -> bytes:
    return json.dumps({"imports": [[round(t, 3), n] for t, n in charges]}).encode()


def decode_budget(raw: bytes) -> list[tuple[float, float]]:
    """(time, imports) pairs; ``ValueError`` for anything else."""
    try:
        charges = json.loads(raw)["imports"]
        decoded = [(float(t), float(n)) for t, n in charges]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"not an import-budget record: {exc}") from None
    if not all(math.isfinite(t) and math.isfinite(n) and n >= 0 for t, n in decoded):
        raise ValueError("not an import-budget record: bad numbers")
    return decoded


@dataclass
class RestoreStats:
    partitions: list[int]
    records: int
    emails: int
    seconds: float


class LedgerStore:
    def __init__(
        self,
        topic: str,
        producer: Any,
        consumer_config: Mapping[str, Any],
        *,
        codec: LedgerCodec | None = None,
        progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.topic = topic
        self.codec = codec or LedgerCodec()
        self.index = CompactIndex()
        self._producer = producer
        self._consumer_config = dict(consumer_config)
        self.progress = progress
        self._retry: list[tuple[int, bytes, bytes, Callable[[], None]]] = []
        # Import-budget histories found by the last restore, by partition (absent: none written).
        self.budgets: dict[int, list[tuple[float, float]]] = {}
        self.in_flight = 0
        self.write_failures = 0
        self.on_failure: Callable[[], None] = lambda: None

    # ---- restore ---------------------------------------------------------------------------

    def restore(self, partitions: list[int]) -> RestoreStats:
        """Load ``partitions`` to their end, replacing what the index held for them."""
        started = time.monotonic()
        latest: dict[int, dict[str, bytes]] = {p: {} for p in partitions}
        records = 0
        for partition, key, value in _read_to_end(
            self._consumer_config, self.topic, partitions, self.progress, skip_budget=False
        ):
            records += 1
            if value is None:
                latest[partition].pop(key, None)  # a tombstone
            else:
                latest[partition][key] = value
        for partition in partitions:
            raw = latest[partition].pop(BUDGET_KEY, None)
            self.budgets.pop(partition, None)
            if raw is None:
                continue
            try:
                self.budgets[partition] = decode_budget(raw)
            except ValueError as exc:
                # Written by us, so unexpected; the cost of ignoring it is at most one
                # "Rate limit exceeded." from AC (back-pressure), never a lost change.
                logger.warning(
                    "unreadable import-budget record ignored",
                    extra={"partition": partition, "error": str(exc)},
                )
        emails = 0
        for partition, values in latest.items():
            # Decode only the last record of each email: earlier ones are superseded.
            packed = {
                email: self.index.pack(self.codec.decode(raw)) for email, raw in values.items()
            }
            values.clear()
            self.index.replace(partition, packed)
            emails += len(packed)
            self.progress()
        return RestoreStats(sorted(partitions), records, emails, time.monotonic() - started)

    def forget(self, partitions: set[int]) -> None:
        self.index.forget(partitions)

    def get(self, partition: int, email: str) -> LedgerEntry | None:
        return self.index.get(partition, email)

    # ---- writes ----------------------------------------------------------------------------

    def write(
        self, partition: int, email: str, entry: LedgerEntry, on_written: Callable[[], None]
    ) -> None:
        """Record ``entry`` now (later decisions see it) and on the topic; ``on_written`` runs
        on the broker's ack, from ``poll``."""
        self.index.put(partition, email, entry)
        self._produce(partition, email.encode(), self.codec.encode(entry), on_written)

    def write_budget(self, partition: int, charges: list[tuple[float, float]]) -> None:
        """Record the partition's import-budget history for its next owner."""
        self._produce(partition, BUDGET_KEY.encode(), encode_budget(charges), lambda: None)

    def _produce(
        self, partition: int, key: bytes, value: bytes, on_written: Callable[[], None]
    ) -> None:
        def delivered(err: Any, _msg: Any) -> None:
            self.in_flight -= 1
            if err is not None:
                self.write_failures += 1
                self.on_failure()
                logger.error(
                    "ledger write failed; will retry",
                    extra={"error": str(err), "partition": partition},
                )
                self._retry.append((partition, key, value, on_written))
                return
            on_written()

        produce_when_room(
            self._producer,
            self.topic,
            key=key,
            value=value,
            partition=partition,
            on_delivery=delivered,
        )
        self.in_flight += 1

    def poll(self) -> None:
        """Serve delivery callbacks (the producer is shared with the DLQ); resend failures."""
        self._producer.poll(0)
        retry, self._retry = self._retry, []
        for item in retry:
            self._produce(*item)

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.in_flight or self._retry) and time.monotonic() < deadline:
            self._producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
            self.poll()


def _read_to_end(
    consumer_config: Mapping[str, Any],
    topic: str,
    partitions: list[int],
    progress: Callable[[], None] = lambda: None,
    key_filter: bytes | None = None,
    skip_budget: bool = True,
) -> Iterator[tuple[int, str, bytes | None]]:
    """Every record of ``partitions`` from the beginning to the end seen when reading started
    (the import-budget records only with ``skip_budget=False``)."""
    if not partitions:
        return
    config = {
        k: v
        for k, v in consumer_config.items()
        if k not in ("partition.assignment.strategy", "group.instance.id", "error_cb")
    }
    config.update(
        {
            "group.id": f"{config.get('group.id', 'ac-audience-sync')}.ledger-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            # Answer as soon as a partition's end is reached: the default 500 ms wait per fetch
            # is most of the time taken to restore a small or empty ledger.
            "fetch.wait.max.ms": 10,
            # A bounded prefetch: the restore's memory is the index, not librdkafka's queue.
            "queued.max.messages.kbytes": min(
                16384, int(config.get("queued.max.messages.kbytes", 16384))
            ),
        }
    )
    consumer = Consumer(config)
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        open_partitions = set(partitions)
        last_note = time.monotonic()
        while open_partitions:
            for message in consumer.consume(RESTORE_BATCH, 0.1):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        open_partitions.discard(message.partition())
                    elif error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                        raise LookupError(f"ledger topic {topic} does not exist")
                    else:
                        logger.warning("ledger read error", extra={"error": error.str()})
                    continue
                key = message.key()
                if key is None or (key_filter is not None and key != key_filter):
                    continue
                if key_filter is None and skip_budget and key == BUDGET_KEY.encode():
                    continue
                yield int(message.partition() or 0), key.decode(), message.value()
            if time.monotonic() - last_note > 10:
                last_note = time.monotonic()
                logger.info(
                    "ledger restore in progress", extra={"open_partitions": len(open_partitions)}
                )
            progress()
    finally:
        consumer.close()


def read_entries(
    consumer_config: Mapping[str, Any],
    topic: str,
    partitions: list[int],
    email: str | None = None,
) -> dict[str, LedgerEntry]:
    """The latest entry of every email (or of one) in the ledger: for ``explain``/``reconcile``."""
    codec = LedgerCodec()
    latest: dict[str, bytes | None] = {}
    key = email.encode() if email is not None else None
    for _partition, found, value in _read_to_end(
        consumer_config, topic, partitions, key_filter=key
    ):
        latest[found] = value
    return {k: codec.decode(v) for k, v in latest.items() if v is not None}


def read_list(
    consumer_config: Mapping[str, Any], topic: str, partitions: list[int], label: str
) -> dict[str, LedgerEntry]:
    """Every email's latest entry, cut down to one list (for ``reconcile``): memory grows with
    that list's members, not with the whole ledger's decoded records."""
    codec = LedgerCodec()
    found: dict[str, LedgerEntry] = {}
    for _partition, email, value in _read_to_end(consumer_config, topic, partitions):
        state = codec.decode(value).state(label) if value is not None else None
        if state is None:
            found.pop(email, None)  # a later record without the list (or a tombstone) wins
        else:
            found[email] = LedgerEntry(None, 0, (state,))
    return found

"""Private readers of whole partitions, built on confluent-kafka consumers that are assigned
(never subscribed): the ledger restore's ``LogReader`` (``KafkaLogReader``,
``kafka_log_reader``), the operator's commands' ``RecordScanner`` (whole records, headers
included: ``redrive``) and ``offsets_at`` (the first offset at or after a time).

Invariants (``reader_config``): no group membership, no commits, end-of-partition events, an
answer as soon as a partition's end is reached, a bounded prefetch; each reader reads its
partitions to the end seen when reading started (``done``) and raises ``LookupError`` for a
topic that does not exist. The port they implement (``LogReader``) is in ``kafka.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from service.adapters.kafka import (
    LogReader,
    LogReaderFactory,
    Record,
    RecordReader,
    RecordReaderFactory,
)

logger = logging.getLogger(__name__)


def reader_config(consumer_config: Mapping[str, Any]) -> dict[str, Any]:
    """A private reader's librdkafka config: no group membership, no commits, end-of-partition
    events, an answer as soon as a partition's end is reached, a bounded prefetch."""
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
            # The default 500 ms wait per fetch is most of the time taken to read a small log.
            "fetch.wait.max.ms": 10,
            "queued.max.messages.kbytes": min(
                16384, int(config.get("queued.max.messages.kbytes", 16384))
            ),
        }
    )
    return config


class KafkaLogReader:
    """``LogReader`` over a confluent-kafka consumer assigned (not subscribed) at the beginning."""

    def __init__(
        self, consumer_config: Mapping[str, Any], topic: str, partitions: Sequence[int]
    ) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition
        from confluent_kafka import Consumer as KafkaConsumer

        self.topic = topic
        self._open = set(partitions)
        self._consumer: Any = None
        if partitions:
            self._consumer = KafkaConsumer(reader_config(consumer_config))
            self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def read(self, max_records: int, timeout: float) -> list[tuple[int, bytes, bytes | None]]:
        from confluent_kafka import KafkaError

        if self._consumer is None or not self._open:
            return []
        found: list[tuple[int, bytes, bytes | None]] = []
        for message in self._consumer.consume(max_records, timeout):
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._open.discard(message.partition())
                elif error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise LookupError(f"topic {self.topic} does not exist")
                else:
                    logger.warning("log read error", extra={"error": error.str()})
                continue
            key = message.key()
            if key is not None:
                found.append((int(message.partition() or 0), key, message.value()))
        return found

    def done(self) -> bool:
        return not self._open

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def kafka_log_reader(consumer_config: Mapping[str, Any]) -> LogReaderFactory:
    def factory(topic: str, partitions: Sequence[int]) -> LogReader:
        return KafkaLogReader(consumer_config, topic, partitions)

    return factory


class RecordScanner:
    """Reads partitions of one topic, each from a given offset (``OFFSET_BEGINNING`` = -2) to
    the end seen when reading started, keyless records and headers included (``redrive``)."""

    def __init__(
        self, consumer_config: Mapping[str, Any], topic: str, starts: Mapping[int, int]
    ) -> None:
        from confluent_kafka import Consumer as KafkaConsumer
        from confluent_kafka import TopicPartition

        self.topic = topic
        self._open = set(starts)
        self._consumer: Any = None
        if starts:
            self._consumer = KafkaConsumer(reader_config(consumer_config))
            self._consumer.assign([TopicPartition(topic, p, o) for p, o in sorted(starts.items())])

    def read(self, max_records: int, timeout: float) -> list[Record]:
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError

        if self._consumer is None or not self._open:
            return []
        found: list[Record] = []
        for message in self._consumer.consume(max_records, timeout):
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._open.discard(message.partition())
                elif error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise LookupError(f"topic {self.topic} does not exist")
                else:
                    logger.warning("log read error", extra={"error": error.str()})
                continue
            kind, stamp = message.timestamp()
            found.append(
                Record(
                    int(message.partition() or 0),
                    int(message.offset() or 0),
                    0 if kind == TIMESTAMP_NOT_AVAILABLE else int(stamp),
                    message.key(),
                    message.value(),
                    tuple(message.headers() or ()),
                )
            )
        return found

    def done(self) -> bool:
        return not self._open

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None


def record_scanner(consumer_config: Mapping[str, Any]) -> RecordReaderFactory:
    """The read-ahead's reader of a backlog (``pipeline/ahead.py``): a ``RecordScanner``."""

    def factory(topic: str, starts: Mapping[int, int]) -> RecordReader:
        return RecordScanner(consumer_config, topic, starts)

    return factory


def offsets_at(
    consumer_config: Mapping[str, Any],
    topic: str,
    partitions: Sequence[int],
    at_ms: int,
    timeout: float,
) -> dict[int, int]:
    """Per partition, the first offset whose timestamp is at or after ``at_ms`` (-1: none,
    the partition has nothing that recent)."""
    from confluent_kafka import Consumer as KafkaConsumer
    from confluent_kafka import TopicPartition

    consumer = KafkaConsumer(reader_config(consumer_config))
    try:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, at_ms) for p in partitions], timeout=timeout
        )
        return {tp.partition: tp.offset for tp in found}
    finally:
        consumer.close()

"""Kafka ports: the parts of confluent-kafka the pipeline uses, as Protocols, and the adapters
built on them.

The pipeline never names ``confluent_kafka.Consumer`` or ``Producer``: it receives objects
that satisfy ``Consumer`` / ``Producer`` / ``LogReaderFactory``. In production those are
confluent-kafka's own clients (``kafka_readers.KafkaLogReader`` wraps one for the ledger
restore); in the deterministic simulation (``tests/simulation/kafka.py``) they are an in-memory
cluster on virtual time. One contract test suite runs against both (``tests/component/test_kafka_contract.py``),
so the simulated broker cannot drift from the real one.

Semantics the pipeline relies on (and the contract tests pin):
- ``consume(n, timeout)`` returns at most ``n`` messages; rebalance callbacks
  ``on_assign/on_revoke/on_lost(consumer, partitions)`` run *inside* ``consume`` (``on_revoke``
  also inside ``close``) on the calling thread; an assigned partition is read from the group's
  committed offset; with ``enable.partition.eof`` a message whose ``error().code()`` is
  ``KafkaError._PARTITION_EOF`` marks the end of a partition;
- ``pause`` drops what was prefetched for those partitions: after ``resume`` they are read
  again from the position after the last message ``consume`` returned. A pause outlives the
  assignment: a partition this consumer paused, then lost or revoked, comes back *paused*
  (librdkafka keeps it), so whoever is assigned a partition decides its pause state (the loop
  pauses it until its ledger is restored, then resumes it);
- ``commit(offsets=..., asynchronous=False)`` raises ``KafkaException`` when it fails: for a
  member the group dropped (``_STATE`` / ``ILLEGAL_GENERATION`` / ``UNKNOWN_MEMBER_ID``). The
  broker checks the member and its generation, not who owns the partition: a live member's
  commit of another member's partition succeeds, so we never commit a partition we do not
  own; committed offsets never go backwards by our hand;
- ``produce(..., on_delivery=cb)`` raises ``BufferError`` when the local queue is full;
  ``cb(err, msg)`` runs from ``poll``/``flush`` on the calling thread, once per message; per
  partition, records land in produce order (the ledger producer is idempotent);
- ``purge(in_queue=True, in_flight=False)`` drops records never sent; their callbacks report
  ``KafkaError._PURGE_QUEUE`` (they never land).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from confluent_kafka import TopicPartition

RebalanceCallback = Callable[[Any, list[Any]], None]
DeliveryCallback = Callable[[Any, Any], None]


class KafkaErrorLike(Protocol):
    def code(self) -> int: ...

    def str(self) -> str: ...


class Message(Protocol):
    def error(self) -> KafkaErrorLike | None: ...

    def topic(self) -> str | None: ...

    def partition(self) -> int | None: ...

    def offset(self) -> int | None: ...

    def key(self) -> bytes | None: ...

    def value(self) -> bytes | None: ...

    def timestamp(self) -> tuple[int, int]: ...

    def headers(self) -> list[tuple[str, bytes]] | None: ...


class Consumer(Protocol):
    def subscribe(
        self,
        topics: list[str],
        on_assign: Any = None,
        on_revoke: Any = None,
        on_lost: Any = None,
    ) -> None: ...

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]: ...

    def pause(self, partitions: list[TopicPartition]) -> None: ...

    def resume(self, partitions: list[TopicPartition]) -> None: ...

    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[False]
    ) -> list[TopicPartition]: ...

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]: ...

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]: ...

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...

    def close(self) -> None: ...


class Producer(Protocol):
    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        callback: Any = None,
        on_delivery: Any = None,
        timestamp: int = 0,
        headers: Any = None,
    ) -> None: ...

    def poll(self, timeout: float = -1) -> int: ...

    def flush(self, timeout: float = -1) -> int: ...

    def purge(
        self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True
    ) -> None: ...

    def __len__(self) -> int: ...


class LogReader(Protocol):
    """Reads whole partitions of one topic from the beginning to the end seen when reading
    started, in small steps (so a long restore never holds the loop)."""

    def read(self, max_records: int, timeout: float) -> list[tuple[int, bytes, bytes | None]]:
        """Up to ``max_records`` records as (partition, key, value); keyless records skipped."""
        ...

    def done(self) -> bool:
        """Every partition reached its end."""
        ...

    def close(self) -> None: ...


class LogReaderFactory(Protocol):
    def __call__(self, topic: str, partitions: Sequence[int]) -> LogReader: ...


@dataclass(frozen=True)
class Record:
    """One record as read: coordinates, timestamp (ms; 0 when unknown), key, value, headers."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


class RecordReader(Protocol):
    """Reads partitions of one topic, each from a given offset (``OFFSET_BEGINNING`` = -2) to
    the end seen when reading started, in small steps, records with their coordinates."""

    def read(self, max_records: int, timeout: float) -> list[Record]: ...

    def done(self) -> bool:
        """Every partition reached its end."""
        ...

    def close(self) -> None: ...


class RecordReaderFactory(Protocol):
    def __call__(self, topic: str, starts: Mapping[int, int]) -> RecordReader: ...


# ---- the acked producer: one helper for the DLQ and the ledger ---------------------------------


@dataclass
class _Record:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    on_ack: Callable[[], None]
    on_failure: Callable[[str], bool]


@dataclass
class AckedProducer:
    """Produce records whose broker acknowledgement completes work.

    ``send`` produces now (waiting, while serving callbacks, when librdkafka's queue is full: a
    record whose ack completes offsets is never dropped for want of room). On the broker's ack
    ``on_ack()`` runs; on a failure ``on_failure(reason)`` runs and decides: True = resend the
    same record (from the next ``poll``), False = the caller handles it (it will send something
    else, or nothing). Callbacks run on the thread that calls ``poll``/``flush``.
    """

    producer: Producer
    sleep: Callable[[float], None] = time.sleep
    in_flight: int = 0
    _retry: list[_Record] = field(default_factory=list)

    def send(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        on_ack: Callable[[], None],
        on_failure: Callable[[str], bool],
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        self._produce(_Record(topic, partition, key, value, headers, on_ack, on_failure))

    def _produce(self, record: _Record) -> None:
        def delivered(err: Any, _msg: Any) -> None:
            self.in_flight -= 1
            if err is None:
                record.on_ack()
                return
            reason = err.str() if hasattr(err, "str") else str(err)
            if record.on_failure(reason):
                self._retry.append(record)

        kwargs: dict[str, Any] = {
            "key": record.key,
            "value": record.value,
            "partition": record.partition,
            "on_delivery": delivered,
        }
        if record.headers is not None:
            kwargs["headers"] = record.headers
        while True:
            try:
                self.producer.produce(record.topic, **kwargs)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.in_flight += 1

    def poll(self) -> None:
        """Serve delivery callbacks; resend what asked to be resent."""
        self.producer.poll(0)
        retry, self._retry = self._retry, []
        for record in retry:
            self._produce(record)

    @property
    def idle(self) -> bool:
        return not self.in_flight and not self._retry

    def flush(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> bool:
        """Wait up to ``timeout`` for every record to be acknowledged (or given up by its
        owner). True when nothing is left."""
        deadline = clock() + timeout
        while not self.idle and clock() < deadline:
            self.producer.flush(min(0.2, max(0.0, deadline - clock())))
            self.poll()
        return self.idle

    def purge_unsent(self) -> None:
        """Drop what librdkafka has not sent yet (it can never land): their callbacks report a
        failure from the next ``poll``. Records on the wire are left to their answer."""
        self.producer.purge(in_queue=True, in_flight=False, blocking=True)

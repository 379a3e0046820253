"""The dry run's edges (``run --dry-run``; README "Preview"): the ports of a preview.

- ``PreviewExecutor`` wraps the real executor: every AC call goes through
  ``service/core/preview.py:previewed``, so writes are answered by the shadow and only reads
  reach AC, through the real ``HttpDriver`` and rate limiter (they count against the budget).
- ``SharedShadow`` is the shadow behind a lock: worker threads answer writes while the loop's
  thread pairs them with decisions and reads the report.
- ``DiscardingProducer`` is the producer of the ledger and the DLQ: it acknowledges every record
  at the next ``poll`` and sends nothing. The ledger store keeps its in-memory index, so the
  run's own decisions stay consistent within the run; the ledger topic is only read.
- ``EndWatch`` wraps the consumer to tell when every assigned partition has been read to its
  end (the run then stops, unless it follows the topic).
- ``empty_log`` reads a ledger that does not exist yet (the service never ran): nothing.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Literal

from confluent_kafka import KafkaError, TopicPartition

from service.adapters.executor import Executor, Handle
from service.adapters.kafka import Consumer, LogReader
from service.core.acapi import ApiCall, Call, Reply
from service.core.preview import Ask, Local, Shadow, Wrote, previewed


class SharedShadow:
    def __init__(self, shadow: Shadow | None = None) -> None:
        self.shadow = shadow or Shadow()
        self.lock = threading.Lock()

    def plan(self, call: ApiCall) -> Local | Ask:
        with self.lock:
            return self.shadow.plan(call)

    def merge(self, call: ApiCall, reply: Reply) -> Reply:
        with self.lock:
            return self.shadow.merge(call, reply)

    def wrote(self, email: str, contact_id: str | None, list_id: str | None) -> Wrote | None:
        with self.lock:
            return self.shadow.wrote(email, contact_id, list_id)


class PreviewExecutor:
    def __init__(self, inner: Executor, shadow: SharedShadow) -> None:
        self.inner = inner
        self.shadow = shadow

    def submit(self, call: Call[Any], cancel: threading.Event) -> Handle[Any]:
        return self.inner.submit(previewed(call, self.shadow), cancel)

    def shutdown(self) -> None:
        self.inner.shutdown()


class DiscardingProducer:
    """A ``Producer`` that acknowledges and forgets (counted per topic in ``produced``)."""

    def __init__(self) -> None:
        self.produced: Counter[str] = Counter()
        self._acks: list[Callable[[Any, Any], None]] = []

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
    ) -> None:
        self.produced[topic] += 1
        acked = on_delivery or callback
        if acked is not None:
            self._acks.append(acked)

    def poll(self, timeout: float = -1) -> int:
        acks, self._acks = self._acks, []
        for acked in acks:
            acked(None, None)
        return len(acks)

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        return 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        """Nothing is ever on its way: what is queued is acknowledged at the next poll."""

    def __len__(self) -> int:
        return len(self._acks)


class EndWatch:
    """The consumer, watching for the end of each partition: a partition is at its end when
    the last thing ``consume`` returned for it was librdkafka's end-of-partition event."""

    def __init__(self, inner: Consumer) -> None:
        self.inner = inner
        self.at_end: dict[int, bool] = {}
        self.records = 0

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Any]:
        messages = self.inner.consume(num_messages, timeout)
        for message in messages:
            error = message.error()
            if error is None:
                self.at_end[message.partition()] = False
                self.records += 1
            elif error.code() == KafkaError._PARTITION_EOF:
                self.at_end[message.partition()] = True
        return messages

    def read_to_end(self, partitions: Sequence[int]) -> bool:
        return all(self.at_end.get(p, False) for p in partitions)

    def subscribe(
        self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None
    ) -> None:
        self.inner.subscribe(topics, on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.inner.pause(partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.inner.resume(partitions)

    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: Literal[False]
    ) -> list[TopicPartition]:
        return self.inner.commit(offsets=offsets, asynchronous=asynchronous)

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        return self.inner.committed(partitions, timeout=timeout)

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        if timeout < 0:
            return self.inner.get_watermark_offsets(partition, cached=cached)
        return self.inner.get_watermark_offsets(partition, timeout=timeout, cached=cached)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return self.inner.list_topics(topic, timeout=timeout)

    def close(self) -> None:
        self.inner.close()


class _EmptyLog:
    def read(self, max_records: int, timeout: float) -> list[tuple[int, bytes, bytes | None]]:
        return []

    def done(self) -> bool:
        return True

    def close(self) -> None:
        pass


def empty_log(topic: str, partitions: Sequence[int]) -> LogReader:
    return _EmptyLog()

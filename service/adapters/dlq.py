"""The dead-letter topic: a failed record, its reason in headers, completion only on broker ack.

Headers (all strings): ``dlq.reason`` (enumerated), ``dlq.error_class``, ``dlq.detail`` (never an
email or the token), ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``,
``dlq.covered_offsets`` (for an AC refusal: every source offset the final state covered),
``dlq.ac_status`` and ``dlq.ac_code`` when AC refused the change, ``dlq.failed_at`` (epoch ms).
A delivery failure is retried forever: an offset is never completed without the broker's ack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


def produce_when_room(producer: Any, topic: str, **kwargs: Any) -> None:
    """Produce, waiting (and serving delivery callbacks) while librdkafka's queue is full:
    a record whose ack completes offsets is never dropped for want of room."""
    while True:
        try:
            producer.produce(topic, **kwargs)
            return
        except BufferError:
            producer.poll(0.1)


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    reason: str
    error_class: str
    detail: str
    source_topic: str
    source_partition: int
    source_offset: int
    covered_offsets: tuple[int, ...] = ()
    ac_status: int | None = None
    ac_code: str | None = None

    def headers(self, now_ms: int) -> list[tuple[str, bytes]]:
        headers = [
            ("dlq.reason", self.reason),
            ("dlq.error_class", self.error_class),
            ("dlq.detail", self.detail[:500]),
            ("dlq.source.topic", self.source_topic),
            ("dlq.source.partition", str(self.source_partition)),
            ("dlq.source.offset", str(self.source_offset)),
            ("dlq.failed_at", str(now_ms)),
        ]
        if self.covered_offsets:
            headers.append(("dlq.covered_offsets", ",".join(map(str, self.covered_offsets))))
        if self.ac_status is not None:
            headers.append(("dlq.ac_status", str(self.ac_status)))
        if self.ac_code is not None:
            headers.append(("dlq.ac_code", self.ac_code))
        return [(k, v.encode()) for k, v in headers]


class DeadLetterQueue:
    """Produces dead letters; calls ``on_parked(letter)`` once the broker acknowledged one."""

    def __init__(
        self,
        producer: Any,
        topic: str,
        on_parked: Callable[[DeadLetter], None],
        on_failed: Callable[[DeadLetter, str], None] | None = None,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._on_parked = on_parked
        self._on_failed = on_failed
        self._retry: list[DeadLetter] = []
        self.in_flight = 0

    def send(self, letter: DeadLetter) -> None:
        def delivered(err: Any, _msg: Any) -> None:
            self.in_flight -= 1
            if err is not None:
                logger.error(
                    "dead-letter delivery failed; will retry",
                    extra={
                        "error": str(err),
                        "source_partition": letter.source_partition,
                        "source_offset": letter.source_offset,
                    },
                )
                if self._on_failed is not None:
                    self._on_failed(letter, str(err))
                self._retry.append(letter)
                return
            self._on_parked(letter)

        produce_when_room(
            self._producer,
            self._topic,
            key=letter.key,
            value=letter.value,
            headers=letter.headers(int(time.time() * 1000)),
            on_delivery=delivered,
        )
        self.in_flight += 1

    def poll(self) -> None:
        """Serve delivery callbacks; resend what failed."""
        self._producer.poll(0)
        retry, self._retry = self._retry, []
        for letter in retry:
            self.send(letter)

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (self.in_flight or self._retry) and time.monotonic() < deadline:
            self._producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
            self.poll()

"""The dead-letter topic: a failed record, its reason in headers, completion only on broker ack.

Headers (all strings): ``dlq.reason`` (enumerated), ``dlq.error_class``, ``dlq.detail`` (never an
email or the token), ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``,
``dlq.covered_offsets`` (for an AC refusal: every source offset the final state covered),
``dlq.ac_status`` and ``dlq.ac_code`` when AC refused the change, ``dlq.failed_at`` (epoch ms);
then the parked record's own headers, as it had them (``extra_headers``). A record that
``redrive`` put back carries its ``redrive.*`` headers (``service/core/redrive.py``), so when it
fails again it is parked with both histories: the new ``dlq.*`` and the earlier ones.
A delivery failure is retried until the broker acknowledges: an offset is never completed
without the ack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from service.adapters.kafka import AckedProducer

logger = logging.getLogger(__name__)


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
    extra_headers: tuple[tuple[str, bytes], ...] = ()  # the record's own headers

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
        return [(k, v.encode()) for k, v in headers] + list(self.extra_headers)


class DeadLetterQueue:
    def __init__(self, acked: AckedProducer, topic: str, wall: Callable[[], float]) -> None:
        self._acked = acked
        self._topic = topic
        self._wall = wall

    def send(self, letter: DeadLetter, on_parked: Callable[[], None]) -> None:
        """Produce ``letter``; ``on_parked`` runs once the broker acknowledged it."""

        def failed(reason: str) -> bool:
            logger.error(
                "dead-letter delivery failed; will retry",
                extra={
                    "error": reason,
                    "source_partition": letter.source_partition,
                    "source_offset": letter.source_offset,
                },
            )
            return True  # resend the same record

        self._acked.send(
            self._topic,
            -1,
            letter.key,
            letter.value,
            on_parked,
            failed,
            headers=letter.headers(int(self._wall() * 1000)),
        )

"""Parking: a record or a change AC refused for good goes to the dead-letter topic.

- The dead letter carries the source record (key, value, headers), the reason and AC's answer,
  and every source offset it covers; those offsets complete only on the broker's ack of the
  dead letter, and only if the partition is still owned in the same generation
  (``Ownership.owns``): nothing is committed past a record that is neither recorded nor parked.
- The ``Observer`` (the dry run's report) sees each record parked.

``Parking`` is a part of ``Confirmer`` (``confirm.py``): the attributes it declares are the
confirmer's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from service.adapters.dlq import DeadLetter, DeadLetterQueue
from service.core.coalesce import PendingChange
from service.core.errors import PermanentApiError, PoisonMessage
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline.ownership import Ownership
from service.pipeline.recording import Observer

logger = logging.getLogger(__name__)


class Parking:
    """Sends what AC refused for good (or what cannot be decoded) to the dead-letter topic."""

    topic: str
    dlq: DeadLetterQueue
    tracker: OffsetTracker
    ownership: Ownership
    metrics: Metrics
    hasher: Callable[[str], str]
    observer: Observer | None

    def park(
        self,
        change: PendingChange,
        error: PermanentApiError,
        generation: int,
        *,
        reason: str | None = None,
    ) -> None:
        logger.info(
            "ActiveCampaign refused a change; to dead-letter topic",
            extra={
                "email_hash": self.hasher(change.email),
                "ac_status": error.status,
                "ac_code": error.code,
                "partition": change.partition,
            },
        )
        reason = reason or ("list_missing" if error.code == "list_missing" else "ac_rejected")
        if self.observer is not None:
            self.observer.parked(change, reason, None)
        letter = DeadLetter(
            change.email.encode(),
            change.raw,
            reason,
            type(error).__name__,
            error.detail,
            self.topic,
            change.partition,
            change.offsets[-1],
            covered_offsets=tuple(change.offsets),
            ac_status=error.status,
            ac_code=error.code,
            extra_headers=tuple(change.headers or ()),
        )
        self._send(letter, change.partition, generation, tuple(change.offsets))

    def park_record(
        self,
        key: bytes | None,
        value: bytes | None,
        partition: int,
        offset: int,
        poison: PoisonMessage,
        generation: int,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        if self.observer is not None:
            self.observer.parked(None, poison.reason, key)
        letter = DeadLetter(
            key,
            value,
            poison.reason,
            type(poison).__name__,
            poison.detail,
            self.topic,
            partition,
            offset,
            extra_headers=tuple(headers or ()),
        )
        self._send(letter, partition, generation, (offset,))

    def _send(
        self, letter: DeadLetter, partition: int, generation: int, offsets: tuple[int, ...]
    ) -> None:
        def parked() -> None:
            if not self.ownership.owns(partition, generation):
                return
            self.metrics.dlq_records.labels(letter.reason).inc()
            for offset in offsets:
                self.tracker.complete(partition, offset)

        self.dlq.send(letter, parked)

"""The read-ahead: a newly assigned partition's backlog indexed before any of it is processed.

Right after an assignment, while the partition's ledger is restored (its records wait anyway),
a private reader (``RecordReaderFactory``: no group, no commits) reads each new partition from
its committed offset to the end seen then, decodes every record and indexes it
(``core/lookahead.Backlog``). The partition's records then flow; ``Source`` completes at once
every record that a later record of the same key, read ahead, supersedes. What a backlog sends
to AC is then the final state per (email, list), however large the backlog and whatever the
pending bound.

Bounded: at most ``max_keys`` keys over the replica (then reading stops, and the index covers
the prefix read so far), at most ``max_seconds`` of reading, ``slice`` seconds per loop turn.
A record it cannot decode or name is not indexed (it supersedes nothing). A partition whose
committed offset is unknown is not read ahead. A reader that fails ends the read-ahead of its
partitions with what was indexed: the read-ahead only ever saves work, never decides it. The
lists it names are looked up meanwhile (``list_seen``): the first import need not wait for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from service.adapters.kafka import Record, RecordReader, RecordReaderFactory
from service.core.coalesce import ListRef
from service.core.codec import EventDecoder
from service.core.errors import PoisonMessage
from service.core.lists import ListNamer
from service.core.lookahead import Backlog
from service.core.model import MembershipEvent

logger = logging.getLogger(__name__)

BATCH = 2000
OFFSET_BEGINNING = -2  # librdkafka's logical offset: the partition's first record


@dataclass
class _Job:
    starts: dict[int, int]
    reader: RecordReader
    started: float
    backlogs: dict[int, Backlog] = field(default_factory=dict)


@dataclass
class ReadAhead:
    topic: str
    readers: RecordReaderFactory
    decoder: EventDecoder
    namer: ListNamer
    tolerance_ms: int | None
    max_keys: int
    max_seconds: float
    clock: Callable[[], float]
    # Told of each list the backlog names, the first time it is seen: the list is found (or
    # created) while the rest is read, instead of after it (``Delivery.want_list``).
    list_seen: Callable[[ListRef], None] | None = None
    _job: _Job | None = None
    _lists: set[ListRef] = field(default_factory=set)

    @property
    def reading(self) -> frozenset[int]:
        return frozenset(self._job.starts) if self._job else frozenset()

    def start(self, starts: Mapping[int, int]) -> None:
        """Read ahead ``starts`` (partition -> committed offset; -1: none committed, read from
        the beginning as the consumer will). A read already running restarts with the union:
        an assignment may add partitions while it runs."""
        wanted = dict(self._job.starts) if self._job else {}
        wanted.update({p: OFFSET_BEGINNING if o < 0 else o for p, o in starts.items()})
        self.cancel()
        if wanted:
            reader = self.readers(self.topic, wanted)
            job = _Job(wanted, reader, self.clock())
            job.backlogs = {p: Backlog(self.tolerance_ms) for p in wanted}
            self._job = job

    def cancel(self, partitions: set[int] | None = None) -> None:
        """Stop reading (``partitions`` only: the others start again from their offsets)."""
        job, self._job = self._job, None
        if job is None:
            return
        job.reader.close()
        if partitions is not None:
            rest = {p: o for p, o in job.starts.items() if p not in partitions}
            if rest:
                self.start(rest)

    def step(self, seconds: float) -> dict[int, Backlog] | None:
        """Read for up to ``seconds``; once every partition reached its end (or a bound was
        met), the backlogs indexed, by partition (else None)."""
        job = self._job
        if job is None:
            return None
        now = self.clock()
        deadline = now + seconds
        bounded = False
        try:
            while not job.reader.done():
                keys = sum(b.keys for b in job.backlogs.values())
                if keys >= self.max_keys or self.clock() - job.started >= self.max_seconds:
                    bounded = True
                    break
                records = job.reader.read(BATCH, 0.05)
                if records:
                    self._index(job, records)
                if self.clock() >= deadline:
                    return None
        except Exception as exc:  # a reader's failure only ends the read-ahead early
            logger.warning("read-ahead stopped", extra={"error": str(exc)})
            bounded = True
        self._job = None
        job.reader.close()
        keys = sum(b.keys for b in job.backlogs.values())
        for backlog in job.backlogs.values():
            backlog.seal()  # the keys go now, before the records fill the pending bound
        logger.info(
            "backlog read ahead",
            extra={
                "partitions": sorted(job.starts),
                "records": sum(b.records for b in job.backlogs.values()),
                "keys": keys,
                "bounded": bounded,
                "seconds": round(self.clock() - job.started, 3),
            },
        )
        return job.backlogs

    def _index(self, job: _Job, records: list[Record]) -> None:
        decoded = self.decoder.decode_batch([r.value for r in records])
        namer, backlogs = self.namer, job.backlogs
        for record, event in zip(records, decoded, strict=True):
            backlog = backlogs.get(record.partition)
            if backlog is None:
                continue
            offset = record.offset
            backlog.read(offset)
            if not isinstance(event, MembershipEvent):
                continue  # poison, or its schema unavailable now: indexed as nothing
            try:
                target = namer(event)
            except PoisonMessage:
                continue  # the Source parks it when it reads it
            backlog.add((event.email, target), offset, event.occurred_at_ms)
            if target not in self._lists and self.list_seen is not None:
                self._lists.add(target)  # a handful: one per list, however long the backlog
                self.list_seen(target)

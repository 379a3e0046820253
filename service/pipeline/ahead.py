"""The read-ahead: a newly assigned partition's backlog indexed before any of it is processed.

Right after an assignment, while the partition's ledger is restored (its records wait anyway),
a private reader (``RecordReaderFactory``: no group, no commits) reads each new partition from
its committed offset to the end seen then, decodes every record and indexes it
(``core/lookahead.Backlog``). The partition's records then flow; ``Source`` completes at once
every record that a later record of the same key, read ahead, supersedes. What a backlog sends
to AC is then the final state per (email, list), however large the backlog and whatever the
pending bound.

Partitions are read in up to ``GROUPS`` groups, one after the other, and each group's backlogs
are delivered (their records flow) as soon as it is read: on a 500,000-event first load the
first import no longer waits for the whole backlog (5-6 s of decoding) but for its first
quarter. Bounded: at most ``max_keys`` keys indexed at once (the group being read; then
reading stops, the index covers the prefix read so far, and the groups not read are delivered
empty), at most ``max_seconds`` of reading, ``slice`` seconds per loop turn.
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
# A backlog is read a group of partitions at a time, and each group's records flow as soon as it
# is read: the first import of a first load need not wait for the whole backlog to be decoded.
GROUPS = 4
OFFSET_BEGINNING = -2  # librdkafka's logical offset: the partition's first record


@dataclass
class _Job:
    starts: dict[int, int]  # partitions not delivered yet -> the offset their read starts at
    groups: list[list[int]]  # partitions still to read, a group at a time
    started: float
    backlogs: dict[int, Backlog] = field(default_factory=dict)  # not delivered yet
    reader: RecordReader | None = None  # the group being read
    group: list[int] = field(default_factory=list)
    records: int = 0  # of the backlogs delivered (for the log)
    keys: int = 0


def _groups(partitions: list[int]) -> list[list[int]]:
    """At most ``GROUPS`` groups of consecutive partitions, as even as they come."""
    size = max(1, -(-len(partitions) // GROUPS))
    return [partitions[i : i + size] for i in range(0, len(partitions), size)]


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
        """Partitions whose backlog is not delivered yet (their records wait)."""
        return frozenset(self._job.starts) if self._job else frozenset()

    def start(self, starts: Mapping[int, int]) -> None:
        """Read ahead ``starts`` (partition -> committed offset; -1: none committed, read from
        the beginning as the consumer will). A read already running restarts with the union of
        what it had not delivered and ``starts``: an assignment may add partitions meanwhile."""
        wanted = dict(self._job.starts) if self._job else {}
        wanted.update({p: OFFSET_BEGINNING if o < 0 else o for p, o in starts.items()})
        self.cancel()
        if wanted:
            job = _Job(wanted, _groups(sorted(wanted)), self.clock())
            job.backlogs = {p: Backlog(self.tolerance_ms) for p in wanted}
            self._job = job
            self._next_group(job)

    def _next_group(self, job: _Job) -> RecordReader:
        job.group = job.groups.pop(0)
        job.reader = self.readers(self.topic, {p: job.starts[p] for p in job.group})
        return job.reader

    def cancel(self, partitions: set[int] | None = None) -> None:
        """Stop reading (``partitions`` only: the others not delivered start again from their
        offsets)."""
        job, self._job = self._job, None
        if job is None:
            return
        if job.reader is not None:
            job.reader.close()
        if partitions is not None:
            rest = {p: o for p, o in job.starts.items() if p not in partitions}
            if rest:
                self.start(rest)

    def step(self, seconds: float) -> dict[int, Backlog] | None:
        """Read for up to ``seconds``; the backlogs whose group reached its end (every one left
        once a bound is met or the reader fails), by partition; None when none did."""
        job = self._job
        if job is None:
            return None
        deadline = self.clock() + seconds
        found: dict[int, Backlog] = {}
        try:
            while job.groups or job.reader is not None:
                reader = job.reader if job.reader is not None else self._next_group(job)
                if reader.done():
                    reader.close()
                    job.reader = None
                    self._deliver(job, job.group, found)
                    continue
                # The keys of the group being read: a group's are forgotten when it is sealed.
                keys = sum(job.backlogs[p].keys for p in job.group)
                if keys >= self.max_keys or self.clock() - job.started >= self.max_seconds:
                    return self._end(job, found, bounded=True)
                records = reader.read(BATCH, 0.05)
                if records:
                    self._index(job, records)
                if self.clock() >= deadline:
                    return found or None
        except Exception as exc:  # a reader's failure only ends the read-ahead early
            logger.warning("read-ahead stopped", extra={"error": str(exc)})
            return self._end(job, found, bounded=True)
        return self._end(job, found, bounded=False)

    def _deliver(self, job: _Job, partitions: list[int], found: dict[int, Backlog]) -> None:
        for partition in partitions:
            backlog = job.backlogs.pop(partition)
            job.starts.pop(partition)
            job.keys += backlog.keys
            backlog.seal()  # the keys go now, before the records fill the pending bound
            job.records += backlog.records
            found[partition] = backlog

    def _end(self, job: _Job, found: dict[int, Backlog], *, bounded: bool) -> dict[int, Backlog]:
        """Deliver what is left with what was indexed (a bound: the prefix read so far)."""
        self._job = None
        if job.reader is not None:
            job.reader.close()
        self._deliver(job, sorted(job.backlogs), found)
        logger.info(
            "backlog read ahead",
            extra={
                "partitions": sorted(found),
                "records": job.records,
                "keys": job.keys,
                "bounded": bounded,
                "seconds": round(self.clock() - job.started, 3),
            },
        )
        return found

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

"""A Kafka cluster on virtual time, speaking the ports of ``service/adapters/kafka.py``.

What it models (what the loop's promises depend on):
- topics of partitions; per partition, records in produce order, offsets from 0;
- a consumer group with cooperative (incremental) rebalancing: when members come or go, a
  member first gives up what it must (``on_revoke`` inside its next ``consume``), and only once
  every revocation is done do the partitions go to their new owners (``on_assign``); a member
  that crashed loses its partitions after the session timeout (no revoke); a member can be told
  its partitions are *lost* (``on_lost``) while they already go elsewhere;
- committed offsets per group; a commit from a member the group dropped (closed, crashed, or
  lost its session and not yet told) fails with UNKNOWN_MEMBER_ID; like a broker, nothing
  checks who owns the partition (a live member's commit of another's partition is stored, and
  the soak's commit invariants then judge it);
- pause/resume (a pause outlives the partition's assignment, as in librdkafka); end-of-partition
  events; per-partition watermarks;
- producers whose records land after a delay, in order per partition (idempotent), whose acks
  come back from ``poll``/``flush`` (possibly out of order), which can fail without landing or
  fail *after* landing (the broker wrote it, the client timed out), and whose unsent records
  can be purged; a crashed producer's unsent records are lost, those on the wire still land;
  a record counts in ``len(producer)`` and in the local queue (``BufferError`` when full) until
  its callback has run, as in librdkafka;
- compaction of a topic: the last record per key survives, in log order.

``tests/component/test_kafka_contract.py`` runs the same scenarios against this and the real
broker (Tansu), so the two cannot drift apart.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from service.adapters.kafka import Record as ReadRecord
from tests.simulation.world import SimCrash, World

Row = TypeVar("Row")

PARTITION_EOF = KafkaError._PARTITION_EOF
PURGE_QUEUE = KafkaError._PURGE_QUEUE
MSG_TIMED_OUT = KafkaError._MSG_TIMED_OUT


class SimError:
    def __init__(self, code: int, text: str = "") -> None:
        self._code = code
        self._text = text or f"error {code}"

    def code(self) -> int:
        return self._code

    def str(self) -> str:
        return self._text

    def __str__(self) -> str:
        return self._text


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    timestamp_ms: int
    producer: str = ""


class SimMessage:
    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        record: Record | None,
        error: SimError | None = None,
    ) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._record = record
        self._error = error

    def error(self) -> SimError | None:
        return self._error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._record.key if self._record else None

    def value(self) -> bytes | None:
        return self._record.value if self._record else None

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._record.headers if self._record else None

    def timestamp(self) -> tuple[int, int]:
        return (1, self._record.timestamp_ms) if self._record else (0, -1)


@dataclass
class _Partitions:
    name: str
    logs: list[list[Record]]

    def count(self) -> int:
        return len(self.logs)


class _Metadata:
    def __init__(self, topics: dict[str, _Partitions]) -> None:
        self.topics = {
            name: type(
                "T", (), {"partitions": {i: None for i in range(t.count())}, "error": None}
            )()
            for name, t in topics.items()
        }


@dataclass
class Member:
    name: str
    consumer: SimConsumer
    owned: set[int] = field(default_factory=set)
    to_revoke: set[int] = field(default_factory=set)
    to_assign: set[int] = field(default_factory=set)
    to_lose: set[int] = field(default_factory=set)
    alive: bool = True
    in_callback: bool = False  # inside on_assign/on_revoke/on_lost (the rebalance waits)
    fenced: bool = False  # lost its session: out of the group until told (``on_lost``)


@dataclass
class Group:
    name: str
    topic: str
    members: list[Member] = field(default_factory=list)
    committed: dict[int, int] = field(default_factory=dict)
    generation: int = 0


class SimCluster:
    def __init__(self, world: World) -> None:
        self.world = world
        self.topics: dict[str, _Partitions] = {}
        self.groups: dict[str, Group] = {}
        self.session_timeout = 6.0
        self.rebalance_delay = 0.5  # a join or leave takes this long to turn into assignments
        # Faults (probabilities per produce; the simulation's schedule changes them over time).
        self.produce_fail = 0.0
        self.produce_fail_after_landing = 0.0
        self.ack_delay = (0.002, 0.02)
        self.commit_fail = 0.0
        self.on_commit: Callable[[str, int, int], None] = lambda group, partition, offset: None
        self.on_land: Callable[[str, int, int, Record], None] = lambda t, p, o, r: None

    # ---- topics -----------------------------------------------------------------------

    def create(self, topic: str, partitions: int) -> None:
        self.topics.setdefault(topic, _Partitions(topic, [[] for _ in range(partitions)]))

    def log(self, topic: str, partition: int) -> list[Record]:
        return self.topics[topic].logs[partition]

    def append(self, topic: str, partition: int, record: Record) -> int:
        log = self.log(topic, partition)
        log.append(record)
        offset = len(log) - 1
        self.on_land(topic, partition, offset, record)
        return offset

    def partition_for(self, topic: str, key: bytes | None) -> int:
        n = self.topics[topic].count()
        return zlib.crc32(key or b"") % n

    def compact(self, topic: str) -> None:
        """Keep the last record of each key (and keyless records), in log order. Offsets of the
        ledger topic are not used by anyone, so the survivors are simply re-listed."""
        for index, log in enumerate(self.topics[topic].logs):
            last = {r.key: i for i, r in enumerate(log) if r.key is not None}
            keep = set(last.values())
            self.topics[topic].logs[index] = [
                r for i, r in enumerate(log) if r.key is None or i in keep
            ]

    # ---- groups ----------------------------------------------------------------------

    def consumer(self, group: str, name: str) -> SimConsumer:
        return SimConsumer(self, group, name)

    def producer(self, name: str) -> SimProducer:
        return SimProducer(self, name)

    def readers(self) -> Callable[[str, Sequence[int]], SimLogReader]:
        def factory(topic: str, partitions: Sequence[int]) -> SimLogReader:
            return SimLogReader(self, topic, partitions)

        return factory

    def scanners(self) -> Callable[[str, Mapping[int, int]], SimRecordScanner]:
        def factory(topic: str, starts: Mapping[int, int]) -> SimRecordScanner:
            return SimRecordScanner(self, topic, starts)

        return factory

    def _group(self, name: str, topic: str) -> Group:
        return self.groups.setdefault(name, Group(name, topic))

    def join(self, group: str, topic: str, member: Member) -> None:
        g = self._group(group, topic)
        g.members.append(member)
        self.world.after(self.rebalance_delay, lambda: self.rebalance(g))

    def leave(self, group: Group, member: Member, *, crashed: bool) -> None:
        member.alive = False
        if crashed:
            # The coordinator notices after the session timeout; until then nobody owns them.
            self.world.after(self.session_timeout, lambda: self._drop(group, member))
        else:
            self._drop(group, member)

    def _drop(self, group: Group, member: Member) -> None:
        if member in group.members:
            group.members.remove(member)
        member.owned.clear()
        member.to_revoke.clear()
        member.to_assign.clear()
        self.world.after(self.rebalance_delay, lambda: self.rebalance(group))

    def lose(self, group_name: str, member_name: str) -> None:
        """The member missed its session (a long pause): its partitions are lost and go to the
        others at once; it hears about it at its next ``consume``."""
        group = self.groups[group_name]
        if any(m.in_callback for m in group.members):
            self.world.after(0.5, lambda: self.lose(group_name, member_name))
            return
        for member in group.members:
            if member.name == member_name and member.owned:
                member.to_lose |= member.owned
                member.fenced = True
                member.owned = set()
                member.to_revoke.clear()
        self.world.after(self.rebalance_delay, lambda: self.rebalance(group))

    def rebalance(self, group: Group) -> None:
        """Cooperative: revoke what must move; assign free partitions once nothing is being
        revoked (the next call after the revokes completes the move)."""
        live = [m for m in group.members if m.alive]
        if not live:
            return
        if any(m.in_callback for m in group.members):
            # A member is handing partitions over: the coordinator waits for it.
            self.world.after(0.2, lambda: self.rebalance(group))
            return
        total = self.topics[group.topic].count()
        owner = {p: m for m in group.members for p in m.owned | m.to_revoke}
        pending_assign = {p for m in group.members for p in m.to_assign}
        # Target: keep what each member owns up to its fair share; deal out the rest.
        fair = -(-total // len(live))
        keep: dict[str, set[int]] = {m.name: set() for m in live}
        for member in live:
            for p in sorted(member.owned | member.to_assign):
                if len(keep[member.name]) < fair:
                    keep[member.name].add(p)
        taken = {p for ps in keep.values() for p in ps}
        free = [p for p in range(total) if p not in taken]
        for p in free:
            target = min(live, key=lambda m: (len(keep[m.name]), m.name))
            keep[target.name].add(p)
        revoking = False
        for member in live:
            give_up = (member.owned | member.to_assign) - keep[member.name]
            if give_up:
                member.to_assign -= give_up
                member.to_revoke |= give_up & member.owned
                revoking = revoking or bool(give_up & member.owned)
        if revoking:
            group.generation += 1
            return  # assigned once the revokes are done (``_revoked`` calls back)
        for member in live:
            for p in keep[member.name]:
                holder = owner.get(p)
                if holder is member or p in pending_assign:
                    continue
                if holder is not None and holder.alive and p in holder.owned:
                    continue
                member.to_assign.add(p)
        group.generation += 1

    def _revoked(self, group: Group) -> None:
        if not any(m.to_revoke for m in group.members if m.alive):
            self.world.after(0.0, lambda: self.rebalance(group))

    def commit(self, group: Group, member: Member, offsets: list[TopicPartition]) -> None:
        if self.world.chance(self.commit_fail):
            raise KafkaException(SimError(KafkaError.REQUEST_TIMED_OUT, "commit timed out"))
        if not member.alive or member.fenced:
            raise KafkaException(
                SimError(KafkaError.UNKNOWN_MEMBER_ID, "Commit failed: Broker: Unknown member")
            )
        # Like a broker (Tansu, Apache Kafka), no check of who owns the partition.
        for tp in offsets:
            group.committed[tp.partition] = tp.offset
            self.on_commit(group.name, tp.partition, tp.offset)


class SimConsumer:
    def __init__(self, cluster: SimCluster, group: str, name: str) -> None:
        self.cluster = cluster
        self.world = cluster.world
        self.group_name = group
        self.member = Member(name, self)
        self.group: Group | None = None
        self.topic = ""
        self.callbacks: dict[str, Callable[[Any, list[TopicPartition]], None]] = {}
        self.position: dict[int, int] = {}
        # The application's pauses. Like librdkafka's, they outlive the assignment: a partition
        # paused, then revoked or lost, and assigned back to this consumer is still paused.
        self.paused: set[int] = set()
        self.at_end: set[int] = set()  # end-of-partition reported since the last new record
        self.closed = False
        self._rr = 0

    def subscribe(
        self,
        topics: list[str],
        on_assign: Any = None,
        on_revoke: Any = None,
        on_lost: Any = None,
    ) -> None:
        self.topic = topics[0]
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.cluster.join(self.group_name, self.topic, self.member)
        self.group = self.cluster.groups[self.group_name]

    def _tps(self, partitions: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(partitions)]

    def _callbacks(self) -> None:
        self.member.in_callback = True
        try:
            self._run_callbacks()
        finally:
            self.member.in_callback = False

    def _run_callbacks(self) -> None:
        member, group = self.member, self.group
        assert group is not None
        if member.to_lose:
            lost, member.to_lose = member.to_lose, set()
            member.fenced = False  # told: it joins again (at once, in the simulation)
            self._forget(lost)
            if self.callbacks.get("lost"):
                self.callbacks["lost"](self, self._tps(lost))
        if member.to_revoke:
            revoke = set(member.to_revoke)
            if self.callbacks.get("revoke"):
                self.callbacks["revoke"](self, self._tps(revoke))
            member.owned -= revoke
            member.to_revoke -= revoke
            self._forget(revoke)
            self.cluster._revoked(group)
        if member.to_assign:
            assign, member.to_assign = member.to_assign, set()
            member.owned |= assign
            for p in assign:
                self.position[p] = max(0, group.committed.get(p, 0))
                self.at_end.discard(p)
            if self.callbacks.get("assign"):
                self.callbacks["assign"](self, self._tps(assign))

    def _forget(self, partitions: set[int]) -> None:
        for p in partitions:
            self.position.pop(p, None)
            self.at_end.discard(p)

    def _fetch(self, limit: int) -> list[SimMessage]:
        found: list[SimMessage] = []
        owned = sorted(p for p in self.member.owned if p not in self.paused)
        if not owned:
            return found
        start = self._rr % len(owned)
        self._rr += 1
        for p in owned[start:] + owned[:start]:
            log = self.cluster.log(self.topic, p)
            pos = self.position.get(p, 0)
            while pos < len(log) and len(found) < limit:
                found.append(SimMessage(self.topic, p, pos, log[pos]))
                pos += 1
                self.at_end.discard(p)
            self.position[p] = pos
            if pos >= len(log) and p not in self.at_end and len(found) < limit:
                self.at_end.add(p)
                found.append(SimMessage(self.topic, p, pos, None, SimError(PARTITION_EOF, "EOF")))
            if len(found) >= limit:
                break
        return found

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[SimMessage]:
        if self.closed or not self.member.alive:
            raise SimCrash(self.member.name)
        self._callbacks()
        found = self._fetch(num_messages)
        if found or timeout <= 0:
            return found
        self.world.sleep(timeout)
        self._callbacks()
        return self._fetch(num_messages)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def commit(
        self, *, offsets: list[TopicPartition], asynchronous: bool = False
    ) -> list[TopicPartition]:
        assert self.group is not None
        self.world.sleep(0.002)  # a round trip to the coordinator
        self.cluster.commit(self.group, self.member, offsets)
        return offsets

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        assert self.group is not None
        return [
            TopicPartition(tp.topic, tp.partition, self.group.committed.get(tp.partition, -1001))
            for tp in partitions
        ]

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return 0, len(self.cluster.log(self.topic, partition.partition))

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return _Metadata(self.cluster.topics)

    def close(self) -> None:
        if self.closed:
            return
        assert self.group is not None
        if self.member.owned and self.callbacks.get("revoke"):
            self.callbacks["revoke"](self, self._tps(self.member.owned))
        self.closed = True
        self.cluster.leave(self.group, self.member, crashed=False)

    def crash(self) -> None:
        """The process died: the coordinator notices after the session timeout."""
        self.closed = True
        if self.group is not None:
            self.cluster.leave(self.group, self.member, crashed=True)


@dataclass
class _Pending:
    topic: str
    partition: int
    record: Record
    callback: Any
    sent_at: float
    landed: bool = False
    done: bool = False
    offset: int = -1001  # where it landed (librdkafka's OFFSET_INVALID until then)


class SimProducer:
    """Records land after a delay, in order per partition; callbacks run from ``poll``."""

    linger = 0.005
    max_queue = 100_000  # librdkafka's queue.buffering.max.messages

    def __init__(self, cluster: SimCluster, name: str) -> None:
        self.cluster = cluster
        self.world = cluster.world
        self.name = name
        self.dead = False
        self.dead_at = float("inf")
        self.queue: list[_Pending] = []  # not yet acknowledged, in produce order
        self.ready: list[tuple[_Pending, SimError | None]] = []  # callbacks to run
        self.purged = 0  # purged records whose callback has not run yet
        self.last_landing: dict[tuple[str, int], float] = {}

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
        if self.dead:
            raise SimCrash(self.name)
        if len(self) >= self.max_queue:
            raise BufferError("Local: Queue full")
        if partition < 0:
            partition = self.cluster.partition_for(topic, key)
        record = Record(key, value, headers, int(self.world.now * 1000), self.name)
        pending = _Pending(
            topic, partition, record, on_delivery or callback, self.world.now + self.linger
        )
        self.queue.append(pending)
        low, high = self.cluster.ack_delay
        # In order per partition: never land before an earlier record of the same partition.
        land_at = max(
            pending.sent_at + self.world.uniform(low, high),
            self.last_landing.get((topic, partition), 0.0),
        )
        self.last_landing[(topic, partition)] = land_at
        fail = self.world.chance(self.cluster.produce_fail)
        fail_after = not fail and self.world.chance(self.cluster.produce_fail_after_landing)
        self.world.at(land_at, lambda: self._deliver(pending, fail, fail_after))

    def _deliver(self, pending: _Pending, fail: bool, fail_after: bool) -> None:
        if pending.done:
            return  # purged before it was sent
        if pending.sent_at > self.dead_at:
            return  # it never left the process that died
        if not fail:
            pending.landed = True
            offset = self.cluster.append(pending.topic, pending.partition, pending.record)
            if not fail_after:
                pending.offset = offset
        if self.dead:
            return
        error = SimError(MSG_TIMED_OUT, "Local: Message timed out") if fail or fail_after else None
        self.ready.append((pending, error))

    def poll(self, timeout: float = -1) -> int:
        if self.dead:
            raise SimCrash(self.name)
        ready, self.ready = self.ready, []
        if len(ready) > 1 and self.world.chance(0.2):
            self.world.rng.shuffle(ready)  # acks out of order
        for pending, error in ready:
            if pending in self.queue:
                self.queue.remove(pending)
            elif pending.done:
                self.purged -= 1
            pending.done = True
            if pending.callback is not None:
                pending.callback(
                    error,
                    SimMessage(pending.topic, pending.partition, pending.offset, pending.record),
                )
        return len(ready)

    def flush(self, timeout: float = -1) -> int:
        deadline = self.world.now + max(0.0, timeout)
        while True:
            self.poll(0)
            if not self.queue or self.world.now >= deadline:
                return len(self.queue)
            self.world.sleep(min(0.005, deadline - self.world.now))

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        """Unsent records are dropped (their callbacks report it at the next poll); records
        on the wire land or fail on their own, as in librdkafka."""
        if not in_queue:
            return
        now = self.world.now
        for pending in list(self.queue):
            if pending.sent_at > now and not pending.done:
                pending.done = True
                self.queue.remove(pending)
                self.purged += 1
                self.ready.append((pending, SimError(PURGE_QUEUE, "Local: Purged in queue")))

    def __len__(self) -> int:
        """Records whose callback has not run yet (librdkafka counts a purged record, and
        one acknowledged, until ``poll`` serves its report)."""
        return len(self.queue) + self.purged

    def crash(self) -> None:
        self.dead = True
        self.dead_at = self.world.now


class _RowReader(Generic[Row]):
    """Rows taken as the log was when reading started; a few ms of virtual time per batch."""

    def __init__(self, cluster: SimCluster, topic: str) -> None:
        if topic not in cluster.topics:
            raise LookupError(f"topic {topic} does not exist")
        self.world = cluster.world
        self.rows: list[Row] = []
        self.at = 0

    def read(self, max_records: int, timeout: float) -> list[Row]:
        chunk = self.rows[self.at : self.at + max_records]
        self.at += len(chunk)
        if self.world.current is not None:
            self.world.sleep(0.001 + len(chunk) * 2e-6)
        return chunk

    def done(self) -> bool:
        return self.at >= len(self.rows)

    def close(self) -> None:
        self.rows = []


class SimLogReader(_RowReader[tuple[int, bytes, bytes | None]]):
    """Reads partitions as they are when it starts, keyed records only."""

    def __init__(self, cluster: SimCluster, topic: str, partitions: Sequence[int]) -> None:
        super().__init__(cluster, topic)
        self.rows = [
            (p, r.key, r.value)
            for p in partitions
            for r in list(cluster.log(topic, p))
            if r.key is not None
        ]


class SimRecordScanner(_RowReader[ReadRecord]):
    """The read-ahead's reader: partitions from given offsets (-2: the beginning) to their end
    when it starts, with coordinates, keyless records included."""

    def __init__(self, cluster: SimCluster, topic: str, starts: Mapping[int, int]) -> None:
        super().__init__(cluster, topic)
        self.rows = [
            ReadRecord(p, offset, r.timestamp_ms, r.key, r.value, tuple(r.headers or ()))
            for p, start in sorted(starts.items())
            for offset, r in enumerate(list(cluster.log(topic, p)))
            if offset >= max(0, start)
        ]

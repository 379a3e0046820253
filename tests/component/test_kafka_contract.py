"""The Kafka contract: one set of scenarios, run against the simulated cluster
(``tests/simulation/kafka.py``) and against the real broker (Tansu) through confluent-kafka, so
the fake cannot drift from the real thing.

Each scenario is written once, as a function of a ``Kafka`` (``SimKafka`` or ``RealKafka``), and
asserts the semantics the pipeline relies on (the docstring of ``service/adapters/kafka.py``).
On the simulation a scenario runs as an actor of a ``World`` (its waits are virtual time); on the
real broker it runs on the test's thread, with the clients production builds (the configs of
``Settings.consumer_config`` / ``producer_config``, ``KafkaLogReader``), with shorter group
timeouts only so that a join takes about a second.

Where the two genuinely differ (how long things take, what is prefetched, how many
rebalance callbacks a change takes) a scenario waits for a state, never for a time, and asserts
only the contract; each such place says why.

What this suite found the simulation doing differently, and fixed there: a paused partition
lost or revoked and assigned back came back unpaused (librdkafka keeps the pause); a live
member's commit of another member's partition was refused (a broker stores it); ``len()`` of a
producer forgot purged records before their report; a full local queue never raised
``BufferError``; delivery reports had no offset.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_INVALID,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import Consumer as KafkaConsumer
from confluent_kafka import Producer as KafkaProducer

from service.adapters.kafka import Consumer, LogReaderFactory, Producer, RecordReaderFactory
from service.adapters.kafka_readers import kafka_log_reader, record_scanner
from service.app.settings import Settings
from service.app.settings_loader import load_settings
from service.devtools.localbroker import create_topics
from tests.simulation.kafka import Record, SimCluster, SimConsumer
from tests.simulation.world import World

PARTITION_EOF = KafkaError._PARTITION_EOF
# What a commit from a member that is no longer in the group may fail with (the docstring of
# service/adapters/kafka.py); Tansu and the simulation answer UNKNOWN_MEMBER_ID.
NOT_A_MEMBER = {KafkaError._STATE, KafkaError.ILLEGAL_GENERATION, KafkaError.UNKNOWN_MEMBER_ID}
# Real group timeouts: Tansu answers a join after about half to two thirds of session.timeout.ms
# (3 s at the service's 6000 ms, 2 s at 3000 ms, 1 s at 1500 ms); max.poll.interval.ms may not be
# below the session timeout, and ``stall`` waits it out.
SESSION_MS = 1500
WAIT = 30.0  # the longest any state is waited for (seconds; virtual on the simulation)
CALLS = 20_000  # the most calls a wait may make (a simulated client that never waits for
# anything would otherwise spin for ever at one virtual instant)
STEP = 0.05  # consume timeout while waiting for a state
LINGER = 1.0  # linger.ms of a producer whose records must still be queued when purged


# ---- the two implementations --------------------------------------------------------------


class Kafka:
    """What a scenario needs: fresh topics and groups, clients, records, time."""

    name = ""

    def topic(self, partitions: int) -> str:
        raise NotImplementedError

    def group(self) -> str:
        return f"g-{uuid.uuid4().hex[:10]}"

    def consumer(self, group: str) -> Consumer:
        raise NotImplementedError

    def producer(self, linger: float | None = None, queue_limit: int | None = None) -> Producer:
        raise NotImplementedError

    def readers(self) -> LogReaderFactory:
        raise NotImplementedError

    def scanners(self) -> RecordReaderFactory:
        raise NotImplementedError

    def produce(
        self, topic: str, records: Sequence[tuple[int, bytes | None, bytes | None]]
    ) -> None:
        """Write (partition, key, value) records and wait until every one has landed (a
        feeder outside the clients under test)."""
        raise NotImplementedError

    def now(self) -> float:
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def stall(self, consumer: Consumer) -> None:
        """The application stops calling ``consume`` long enough for the group to drop the
        member (a long pause): the real member exceeds max.poll.interval.ms and leaves; the
        simulated one is told its session ended (``SimCluster.lose``, the sim's model of it)."""
        raise NotImplementedError

    def run(self, scenario: Callable[[Kafka], None]) -> None:
        raise NotImplementedError


class SimKafka(Kafka):
    name = "sim"

    def __init__(self, seed: int) -> None:
        self.world = World(seed)
        self.cluster = SimCluster(self.world)
        self._topics = 0
        self._clients = 0

    def topic(self, partitions: int) -> str:
        self._topics += 1
        name = f"t{self._topics}"
        self.cluster.create(name, partitions)
        return name

    def consumer(self, group: str) -> Consumer:
        self._clients += 1
        return self.cluster.consumer(group, f"c{self._clients}")

    def producer(self, linger: float | None = None, queue_limit: int | None = None) -> Producer:
        self._clients += 1
        producer = self.cluster.producer(f"p{self._clients}")
        if linger is not None:
            producer.linger = linger
        if queue_limit is not None:
            producer.max_queue = queue_limit
        return producer

    def readers(self) -> LogReaderFactory:
        return self.cluster.readers()

    def scanners(self) -> RecordReaderFactory:
        return self.cluster.scanners()

    def produce(
        self, topic: str, records: Sequence[tuple[int, bytes | None, bytes | None]]
    ) -> None:
        for partition, key, value in records:
            self.cluster.append(
                topic, partition, Record(key, value, None, int(self.world.now * 1000))
            )

    def now(self) -> float:
        return self.world.now

    def sleep(self, seconds: float) -> None:
        self.world.sleep(seconds)

    def stall(self, consumer: Consumer) -> None:
        assert isinstance(consumer, SimConsumer)
        self.cluster.lose(consumer.group_name, consumer.member.name)
        self.world.sleep(self.cluster.rebalance_delay * 2)

    def run(self, scenario: Callable[[Kafka], None]) -> None:
        actor = self.world.spawn("scenario", lambda: scenario(self))
        self.world.run(until=self.world.now + 3600.0, stop=lambda: actor.finished)
        if actor.error is not None:
            raise actor.error
        assert actor.finished, "the scenario did not finish within a virtual hour"


class RealKafka(Kafka):
    name = "real"

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumers: list[Any] = []
        self._producers: list[Any] = []
        self._feeder: Any = None

    def settings(self, group: str = "contract") -> Settings:
        return load_settings(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "KAFKA_TOPIC": "contract",
                "KAFKA_GROUP_ID": group,
                "KAFKA_PROPERTY_SESSION_TIMEOUT_MS": str(SESSION_MS),
                "KAFKA_PROPERTY_HEARTBEAT_INTERVAL_MS": str(SESSION_MS // 6),
                "KAFKA_PROPERTY_MAX_POLL_INTERVAL_MS": str(SESSION_MS),
                "AC_API_URL": "https://acct.api-us1.com",
                "AC_API_TOKEN": "contract-token-0123456789",
                "AC_LIST_SENDER_URL": "https://www.acme-corp.test",
            }
        )

    def topic(self, partitions: int) -> str:
        name = f"contract-{uuid.uuid4().hex[:10]}"
        create_topics(self.bootstrap, {name: partitions})
        return name

    def consumer(self, group: str) -> Consumer:
        config = self.settings(group).consumer_config()
        # What the contract is about, stated here rather than trusted to the defaults.
        assert config["partition.assignment.strategy"] == "cooperative-sticky"
        assert config["enable.partition.eof"] == "true"
        consumer = KafkaConsumer(config)
        self._consumers.append(consumer)
        return consumer

    def producer(self, linger: float | None = None, queue_limit: int | None = None) -> Producer:
        config = self.settings().producer_config()
        if linger is not None:
            config["linger.ms"] = int(linger * 1000)
        if queue_limit is not None:
            config["queue.buffering.max.messages"] = queue_limit
        producer = KafkaProducer(config)
        self._producers.append(producer)
        return producer

    def readers(self) -> LogReaderFactory:
        return kafka_log_reader(self.settings().consumer_config())

    def scanners(self) -> RecordReaderFactory:
        return record_scanner(self.settings().consumer_config())

    def produce(
        self, topic: str, records: Sequence[tuple[int, bytes | None, bytes | None]]
    ) -> None:
        if self._feeder is None:
            self._feeder = KafkaProducer({**self.settings().producer_config(), "linger.ms": 0})
        failed: list[Any] = []
        for partition, key, value in records:
            self._feeder.produce(
                topic,
                key=key,
                value=value,
                partition=partition,
                on_delivery=lambda err, _msg: failed.append(err) if err else None,
            )
        assert self._feeder.flush(15) == 0, "the feeder's records did not land"
        assert not failed, failed

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def stall(self, consumer: Consumer) -> None:
        # librdkafka leaves the group once max.poll.interval.ms passes without a consume; it
        # checks about once a second.
        time.sleep(SESSION_MS / 1000 + 2.0)

    def run(self, scenario: Callable[[Kafka], None]) -> None:
        scenario(self)

    def close(self) -> None:
        for consumer in self._consumers:
            with contextlib.suppress(RuntimeError):  # closed by the scenario
                consumer.close()
        for producer in [*self._producers, self._feeder]:
            if producer is not None:
                producer.purge(in_queue=True, in_flight=False)
                producer.flush(5)
        # Let the clients go now, not when the session's broker is already gone.
        self._consumers.clear()
        self._producers.clear()
        self._feeder = None


@pytest.fixture(params=["sim-1", "sim-2", "sim-3", "real"])
def kafka(request: pytest.FixtureRequest) -> Iterator[Kafka]:
    """Every scenario on three seeds of the simulation (acks, their order and the landing
    delays are drawn from the seed) and on the real broker."""
    if request.param == "real":
        real = RealKafka(request.getfixturevalue("bootstrap"))
        try:
            yield real
        finally:
            real.close()
    else:
        yield SimKafka(seed=int(request.param.split("-")[1]))


# ---- a consumer as the pipeline sees it -----------------------------------------------------


@dataclass
class Event:
    kind: str  # assign / revoke / lost
    partitions: frozenset[int]
    where: str | None  # the client call it ran inside (None: outside any call)
    thread: int


@dataclass
class Eof:
    partition: int
    offset: int
    last_record: int | None  # the partition's last record returned before it


@dataclass
class Probe:
    """A subscribed consumer, what it was told (rebalance callbacks) and what it returned.
    Nothing is asserted inside a callback (the real client would wrap the error); ``problems``
    collects what broke the contract there and each scenario asserts it empty."""

    consumer: Consumer
    topic: str
    name: str
    where: str | None = None
    events: list[Event] = field(default_factory=list)
    owned: set[int] = field(default_factory=set)
    records: dict[int, list[tuple[int, bytes | None, bytes | None]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    eofs: list[Eof] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    closed: bool = False

    @classmethod
    def subscribe(cls, consumer: Consumer, topic: str, name: str) -> Probe:
        probe = cls(consumer, topic, name)
        consumer.subscribe(
            [topic],
            on_assign=probe._callback("assign"),
            on_revoke=probe._callback("revoke"),
            on_lost=probe._callback("lost"),
        )
        return probe

    def _callback(self, kind: str) -> Callable[[Any, list[TopicPartition]], None]:
        def callback(consumer: Any, partitions: list[TopicPartition]) -> None:
            parts = frozenset(tp.partition for tp in partitions)
            self.events.append(Event(kind, parts, self.where, threading.get_ident()))
            if consumer is not self.consumer:
                self.problems.append(f"{kind}: called with another consumer")
            if any(tp.topic != self.topic for tp in partitions):
                self.problems.append(f"{kind}: partitions of another topic {partitions}")
            if kind == "assign":
                if parts & self.owned:
                    self.problems.append(f"assign of owned {sorted(parts & self.owned)}")
                self.owned |= parts
            else:
                if parts - self.owned:
                    self.problems.append(f"{kind} of partitions not owned {sorted(parts)}")
                self.owned -= parts

        return callback

    def consume(self, n: int = 100, timeout: float = STEP) -> list[Any]:
        self.where = "consume"
        try:
            batch = self.consumer.consume(n, timeout)
        finally:
            self.where = None
        if len(batch) > n:
            self.problems.append(f"consume({n}) returned {len(batch)} messages")
        for message in batch:
            partition = message.partition()
            error = message.error()
            if error is not None and error.code() != PARTITION_EOF:
                # Not part of the contract: the sim never sends one; the real client may
                # (e.g. _MAX_POLL_EXCEEDED after a stall). Kept for the failure messages.
                self.errors.append(error.code())
                continue
            if message.topic() != self.topic:
                self.problems.append(f"a message of topic {message.topic()}")
            if partition not in self.owned:
                self.problems.append(f"a message of partition {partition}, not owned")
            seen = self.records[partition]
            if error is None:
                seen.append((message.offset(), message.key(), message.value()))
            else:
                self.eofs.append(Eof(partition, message.offset(), seen[-1][0] if seen else None))
        return batch

    def close(self) -> None:
        self.where = "close"
        try:
            self.consumer.close()
        finally:
            self.where = None
            self.closed = True

    def offsets(self, partition: int) -> list[int]:
        return [offset for offset, _, _ in self.records[partition]]

    def eof_at(self, partition: int) -> list[int]:
        return [e.offset for e in self.eofs if e.partition == partition]

    def assigned(self) -> set[int]:
        return {p for e in self.events if e.kind == "assign" for p in e.partitions}

    def changes(self) -> list[tuple[str, frozenset[int], str | None]]:
        """The callbacks that moved partitions. The real client also calls on_assign with an
        empty list during a cooperative rebalance; the simulation does not: not a contract."""
        return [(e.kind, e.partitions, e.where) for e in self.events if e.partitions]

    def state(self) -> str:
        return (
            f"{self.name}: owned {sorted(self.owned)}, events "
            f"{[(e.kind, sorted(e.partitions), e.where) for e in self.events]}, eofs "
            f"{[(e.partition, e.offset) for e in self.eofs]}, errors {self.errors}, "
            f"problems {self.problems}"
        )


class Deadline:
    """Bounds a wait by time (``timeout``) and by the number of calls made."""

    def __init__(self, k: Kafka, what: str, timeout: float = WAIT) -> None:
        self.k, self.what, self.timeout = k, what, timeout
        self.at = k.now() + timeout
        self.calls = 0

    def passed(self) -> bool:
        self.calls += 1
        return self.k.now() >= self.at or self.calls > CALLS

    def check(self, state: Callable[[], object]) -> None:
        if self.passed():
            raise AssertionError(
                f"{self.k.name}: {self.what} not reached in {self.timeout}s "
                f"({self.calls} calls)\n{state()}"
            )


def drive(
    k: Kafka,
    probes: Sequence[Probe],
    until: Callable[[], bool],
    what: str,
    n: int = 100,
    timeout: float = WAIT,
    check: Callable[[], None] = lambda: None,
) -> None:
    """Call ``consume`` on every open probe, in turn, until ``until()`` (``check()`` after
    each call). We wait for a state, never a time: the broker takes seconds to join a group,
    the simulation half a virtual second."""
    deadline = Deadline(k, what, timeout)
    while not until():
        deadline.check(lambda: "\n".join(p.state() for p in probes))
        for probe in probes:
            if not probe.closed:
                probe.consume(n)
                check()


def settle(k: Kafka, probes: Sequence[Probe], seconds: float) -> None:
    """Keep consuming for a while: for asserting that something does *not* happen."""
    deadline = Deadline(k, f"{seconds}s of consuming", seconds)
    while not deadline.passed():
        for probe in probes:
            probe.consume()
    assert k.now() >= deadline.at, f"{k.name}: consume never waited ({deadline.calls} calls)"


def eof_everywhere(probe: Probe, ends: dict[int, int]) -> Callable[[], bool]:
    return lambda: all(end in probe.eof_at(p) for p, end in ends.items())


def keyed(partition: int, prefix: str, count: int) -> list[tuple[int, bytes, bytes]]:
    return [(partition, f"{prefix}{i}".encode(), f"v-{prefix}{i}".encode()) for i in range(count)]


def assert_clean(*probes: Probe) -> None:
    main = threading.get_ident()
    for probe in probes:
        assert probe.problems == [], probe.state()
        assert all(e.thread == main for e in probe.events), probe.state()


# ---- 1. consume: per partition in offset order, on_assign inside consume, end of partition ----


def consume_in_order(k: Kafka) -> None:
    topic = k.topic(3)
    written = {0: keyed(0, "a", 5), 1: keyed(1, "b", 3), 2: []}  # partition 2 stays empty
    k.produce(topic, [r for p in (0, 1) for r in written[p]])
    probe = Probe.subscribe(k.consumer(k.group()), topic, "c")
    # Not from subscribe: every rebalance callback runs inside consume, on this thread (``where``
    # and ``thread`` of each event, checked below and by assert_clean).
    assert probe.events == []
    drive(k, [probe], eof_everywhere(probe, {0: 5, 1: 3, 2: 0}), "every partition's end", n=2)
    assert_clean(probe)  # includes: no consume returned more than n=2 messages
    # The real client may call on_assign more than once (cooperative rebalancing sometimes
    # hands an empty list first): the contract is the union, each call inside consume.
    assert probe.assigned() == {0, 1, 2}
    assert {(e.kind, e.where) for e in probe.events} == {("assign", "consume")}
    for partition in (0, 1, 2):
        expected = [(i, key, value) for i, (_, key, value) in enumerate(written[partition])]
        assert probe.records[partition] == expected, probe.state()
    # One end-of-partition event per partition, at its end, after its last record.
    ends = sorted((e.partition, e.offset, e.last_record) for e in probe.eofs)
    assert ends == [(0, 5, 4), (1, 3, 2), (2, 0, None)], probe.state()

    # New records after the end: read in order, then one new end event, for that partition only.
    k.produce(topic, keyed(1, "c", 2))
    drive(k, [probe], lambda: 5 in probe.eof_at(1), "partition 1's new end", n=2)
    assert probe.offsets(1) == [0, 1, 2, 3, 4]
    assert probe.records[1][3:] == [(3, b"c0", b"v-c0"), (4, b"c1", b"v-c1")]
    assert probe.eof_at(1) == [3, 5]
    assert probe.eof_at(0) == [5]
    assert probe.eof_at(2) == [0]
    probe.close()
    assert_clean(probe)


def test_consume_in_offset_order_with_end_of_partition(kafka: Kafka) -> None:
    kafka.run(consume_in_order)


# ---- 2. pause / resume: nothing returned twice, nothing lost ---------------------------------


def pause_and_resume(k: Kafka) -> None:
    topic = k.topic(2)
    k.produce(topic, keyed(0, "a", 40) + keyed(1, "b", 3))
    probe = Probe.subscribe(k.consumer(k.group()), topic, "c")
    drive(k, [probe], lambda: len(probe.records[0]) >= 3, "3 records of partition 0", n=3)
    # Give the real client time to prefetch the rest of partition 0 (the simulation has no
    # prefetch: for it, this is only virtual time). Pausing must drop that prefetch.
    k.sleep(0.5)
    before = probe.offsets(0)
    assert 3 <= len(before) < 40, probe.state()
    probe.consumer.pause([TopicPartition(topic, 0)])
    drive(k, [probe], lambda: 3 in probe.eof_at(1), "partition 1's end while 0 is paused")
    # A paused partition does not hold the others back: records written now still come.
    k.produce(topic, keyed(1, "c", 2))
    drive(k, [probe], lambda: 5 in probe.eof_at(1), "partition 1's new end while 0 is paused")
    settle(k, [probe], 0.5)
    assert probe.offsets(0) == before, "a paused partition delivered records"
    assert probe.eof_at(0) == []

    probe.consumer.resume([TopicPartition(topic, 0)])
    drive(k, [probe], lambda: 40 in probe.eof_at(0), "partition 0's end after resume", n=3)
    # Right after the last returned offset: no record twice, none skipped.
    assert probe.offsets(0) == list(range(40)), probe.state()
    assert probe.records[0][len(before)][0] == before[-1] + 1
    assert probe.offsets(1) == list(range(5))
    probe.close()
    assert_clean(probe)


def test_pause_then_resume_continues_after_the_last_returned_offset(kafka: Kafka) -> None:
    kafka.run(pause_and_resume)


# ---- 3. commit, committed, and where the next member starts -----------------------------------


def commit_and_restart(k: Kafka) -> None:
    topic = k.topic(3)
    k.produce(topic, keyed(0, "a", 6) + keyed(1, "b", 4) + keyed(2, "c", 2))
    group = k.group()
    first = Probe.subscribe(k.consumer(group), topic, "first")
    drive(k, [first], eof_everywhere(first, {0: 6, 1: 4, 2: 2}), "every partition's end")
    everything = [TopicPartition(topic, p) for p in (0, 1, 2)]
    # Nothing committed yet: OFFSET_INVALID on both.
    assert [tp.offset for tp in first.consumer.committed(everything, 10)] == [OFFSET_INVALID] * 3

    result = first.consumer.commit(
        offsets=[TopicPartition(topic, 0, 4), TopicPartition(topic, 1, 1)], asynchronous=False
    )
    assert [(tp.partition, tp.offset, tp.error) for tp in result] == [(0, 4, None), (1, 1, None)]
    committed = first.consumer.committed(everything, 10)
    assert [(tp.partition, tp.offset) for tp in committed] == [(0, 4), (1, 1), (2, OFFSET_INVALID)]
    first.close()

    # The next member of the group starts where the group committed (partition 2, never
    # committed, from the beginning: auto.offset.reset=earliest).
    second = Probe.subscribe(k.consumer(group), topic, "second")
    committed = second.consumer.committed(everything, 10)
    assert [(tp.partition, tp.offset) for tp in committed] == [(0, 4), (1, 1), (2, OFFSET_INVALID)]
    drive(k, [second], eof_everywhere(second, {0: 6, 1: 4, 2: 2}), "every partition's end")
    assert second.offsets(0) == [4, 5]
    assert second.offsets(1) == [1, 2, 3]
    assert second.offsets(2) == [0, 1]
    assert second.records[0][0][1] == b"a4"
    second.close()
    assert_clean(first, second)


def test_committed_offsets_are_where_the_group_resumes(kafka: Kafka) -> None:
    kafka.run(commit_and_restart)


# ---- 4. the producer: callbacks from poll/flush, once each; order; purge ---------------------


@dataclass
class Deliveries:
    """Delivery callbacks, and the producer call each ran inside."""

    where: str | None = None
    seen: list[tuple[int | None, int, bytes | None, int, str | None, int]] = field(
        default_factory=list
    )

    def callback(self, err: Any, msg: Any) -> None:
        code = None if err is None else err.code()
        self.seen.append(
            (code, msg.partition(), msg.key(), msg.offset(), self.where, threading.get_ident())
        )

    def call(self, name: str, method: Callable[[float], int], timeout: float) -> int:
        self.where = name
        try:
            return method(timeout)
        finally:
            self.where = None


def read_all(k: Kafka, topic: str, partitions: list[int]) -> list[tuple[int, bytes, bytes | None]]:
    reader = k.readers()(topic, partitions)
    rows: list[tuple[int, bytes, bytes | None]] = []
    deadline = Deadline(k, "the log reader's end")
    try:
        while not reader.done():
            deadline.check(lambda: rows)
            rows.extend(reader.read(100, 0.1))
    finally:
        reader.close()
    return rows


def produce_and_purge(k: Kafka) -> None:
    topic = k.topic(2)
    main = threading.get_ident()
    acks = Deliveries()
    producer = k.producer()
    order = [(0, b"a0"), (1, b"b0"), (0, b"a1"), (0, b"a2"), (1, b"b1"), (0, b"a3")]
    for partition, key in order:
        producer.produce(
            topic, key=key, value=b"v-" + key, partition=partition, on_delivery=acks.callback
        )
    assert len(producer) == len(order)
    # Records are sent and acknowledged in the background, but no callback runs until the
    # application calls poll or flush; until then each record still counts in len().
    k.sleep(1.0)
    assert acks.seen == []
    assert len(producer) >= len(order)  # librdkafka also counts its report batches

    assert acks.call("flush", producer.flush, 10) == 0
    assert len(producer) == 0
    assert acks.call("poll", producer.poll, 0) == 0  # once per record: nothing left to report
    assert sorted(key for _, _, key, _, _, _ in acks.seen) == sorted(key for _, key in order)
    assert {(err, where, thread) for err, _, _, _, where, thread in acks.seen} == {
        (None, "flush", main)
    }
    # Per partition, records land in produce order (the report's offset, and the log itself).
    for partition in (0, 1):
        keys = [key for p, key in order if p == partition]
        offsets = {key: offset for _, p, key, offset, _, _ in acks.seen if p == partition}
        assert [offsets[key] for key in keys] == list(range(len(keys)))
    landed = read_all(k, topic, [0, 1])
    for partition in (0, 1):
        assert [key for p, key, _ in landed if p == partition] == [
            key for p, key in order if p == partition
        ]

    # purge(in_queue=True, in_flight=False): records still lingering in the local queue are
    # dropped; each reports _PURGE_QUEUE from the next poll, and none ever lands.
    purged = Deliveries()
    # Nothing is sent for a second: purged within microseconds, they are still queued.
    lingering = k.producer(linger=LINGER)
    for partition, key in [(0, b"x0"), (1, b"y0"), (0, b"x1")]:
        lingering.produce(
            topic, key=key, value=b"v", partition=partition, on_delivery=purged.callback
        )
    assert len(lingering) == 3
    lingering.purge(in_queue=True, in_flight=False)
    assert purged.seen == []  # reported from poll, not from purge
    assert len(lingering) >= 3  # a purged record counts until its report is served
    deadline = Deadline(k, "the purged records' reports")
    while len(purged.seen) < 3 and not deadline.passed():
        purged.call("poll", lingering.poll, 0.1)
    assert sorted((err, p, key, where) for err, p, key, _, where, _ in purged.seen) == [
        (KafkaError._PURGE_QUEUE, 0, b"x0", "poll"),
        (KafkaError._PURGE_QUEUE, 0, b"x1", "poll"),
        (KafkaError._PURGE_QUEUE, 1, b"y0", "poll"),
    ]
    assert len(lingering) == 0
    assert purged.call("flush", lingering.flush, 1) == 0
    assert len(purged.seen) == 3
    k.sleep(LINGER + 0.5)  # past the time they would have been sent and acknowledged
    again = read_all(k, topic, [0, 1])
    assert sorted(again, key=lambda row: row[0]) == sorted(landed, key=lambda row: row[0])


def test_producer_callbacks_order_and_purge(kafka: Kafka) -> None:
    kafka.run(produce_and_purge)


def full_queue(k: Kafka) -> None:
    topic = k.topic(1)
    acks = Deliveries()
    producer = k.producer(queue_limit=3)
    for i in range(3):
        producer.produce(topic, key=b"k%d" % i, value=b"v", partition=0, on_delivery=acks.callback)
    # A record holds its place in the queue until its callback ran: a landed record too.
    k.sleep(0.5)
    with pytest.raises(BufferError):
        producer.produce(topic, key=b"k3", value=b"v", partition=0, on_delivery=acks.callback)
    assert acks.call("flush", producer.flush, 10) == 0
    producer.produce(topic, key=b"k3", value=b"v", partition=0, on_delivery=acks.callback)
    assert acks.call("flush", producer.flush, 10) == 0
    # (The simulation may serve acks out of order; the contract is once per record.)
    assert sorted((err, key, offset) for err, _, key, offset, _, _ in acks.seen) == [
        (None, b"k0", 0),
        (None, b"k1", 1),
        (None, b"k2", 2),
        (None, b"k3", 3),
    ]


def test_a_full_local_queue_raises_buffer_error(kafka: Kafka) -> None:
    kafka.run(full_queue)


# ---- 5. the log reader ------------------------------------------------------------------------


def read_log(k: Kafka) -> None:
    topic = k.topic(4)
    k.produce(
        topic,
        [
            (0, b"k1", b"v1"),
            (0, b"k2", b"v2"),
            (0, None, b"keyless"),  # skipped
            (0, b"k1", None),  # a tombstone: included
            (1, b"k3", b"v3"),
            (3, b"k4", b"not asked for"),
        ],
    )
    reader = k.readers()(topic, [0, 1, 2])  # partition 2 is empty, 3 is not read
    assert not reader.done()
    rows: list[tuple[int, bytes, bytes | None]] = []
    deadline = Deadline(k, "the log reader's end")
    while not reader.done():
        deadline.check(lambda: rows)
        batch = reader.read(2, 0.1)
        assert len(batch) <= 2
        rows.extend(batch)
    # Partitions may interleave (the real reader fetches them concurrently): per partition,
    # log order.
    assert sorted(rows, key=lambda row: row[0]) == [
        (0, b"k1", b"v1"),
        (0, b"k2", b"v2"),
        (0, b"k1", None),
        (1, b"k3", b"v3"),
    ]
    # The end is the end: what is written afterwards is not read, and done() stays true.
    k.produce(topic, [(0, b"k5", b"late")])
    assert reader.read(100, 0.2) == []
    assert reader.done()
    reader.close()
    empty = k.readers()(topic, [])
    assert empty.done()
    assert empty.read(100, 0.1) == []
    empty.close()


def test_log_reader_reads_to_the_end_with_tombstones(kafka: Kafka) -> None:
    kafka.run(read_log)


def scan_from_offsets(k: Kafka) -> None:
    """The read-ahead's reader: each partition from its offset (-2: the beginning) to the end
    seen when it started, keyless records included, with their coordinates."""
    topic = k.topic(4)
    k.produce(
        topic,
        [
            (0, b"k1", b"v1"),
            (0, b"k2", b"v2"),
            (0, None, b"keyless"),
            (1, b"k3", b"v3"),
            (1, b"k4", b"v4"),
            (3, b"k5", b"not asked for"),
        ],
    )
    reader = k.scanners()(topic, {0: 1, 1: -2, 2: 0})  # partition 2 is empty, 3 is not read
    rows: list[tuple[int, int, bytes | None, bytes | None]] = []
    deadline = Deadline(k, "the scanner's end")
    while not reader.done():
        deadline.check(lambda: rows)
        batch = reader.read(2, 0.1)
        assert len(batch) <= 2
        rows.extend((r.partition, r.offset, r.key, r.value) for r in batch)
    assert sorted(rows) == [
        (0, 1, b"k2", b"v2"),
        (0, 2, None, b"keyless"),
        (1, 0, b"k3", b"v3"),
        (1, 1, b"k4", b"v4"),
    ]
    k.produce(topic, [(0, b"k6", b"late")])
    assert reader.read(100, 0.2) == []
    assert reader.done()
    reader.close()
    empty = k.scanners()(topic, {})
    assert empty.done()
    assert empty.read(100, 0.1) == []
    empty.close()


def test_scanner_reads_from_offsets_to_the_end(kafka: Kafka) -> None:
    kafka.run(scan_from_offsets)


# ---- 6. two members: partitions split, handed over on close ----------------------------------


def disjoint(*probes: Probe) -> Callable[[], None]:
    def check() -> None:
        for i, a in enumerate(probes):
            for b in probes[i + 1 :]:
                assert not (a.owned & b.owned), f"owned twice: {a.state()}\n{b.state()}"

    return check


def pair(k: Kafka, topic: str, group: str) -> tuple[Probe, Probe]:
    """Two members of one group with the topic's four partitions split between them."""
    a = Probe.subscribe(k.consumer(group), topic, "a")
    drive(k, [a], lambda: a.owned == {0, 1, 2, 3}, "the first member owning everything")
    b = Probe.subscribe(k.consumer(group), topic, "b")
    drive(
        k,
        [a, b],
        lambda: len(a.owned) == 2 and len(b.owned) == 2,
        "the partitions split 2/2",
        check=disjoint(a, b),
    )
    return a, b


def two_members(k: Kafka) -> None:
    topic = k.topic(4)
    k.produce(topic, [(p, b"k", b"v") for p in range(4)])
    a, b = pair(k, topic, k.group())
    assert a.owned | b.owned == {0, 1, 2, 3}
    # Cooperative: the first member gave up exactly what the second got, inside consume,
    # and was never told to give up everything (no eager revoke-all).
    assert a.changes() == [
        ("assign", frozenset({0, 1, 2, 3}), "consume"),
        ("revoke", frozenset(b.owned), "consume"),
    ], a.state()
    assert b.changes() == [("assign", frozenset(b.owned), "consume")], b.state()
    assert all(e.where == "consume" for e in a.events + b.events)

    moving = set(a.owned)
    a.close()
    # Closing gives the member's partitions up: on_revoke runs inside close (or inside a
    # consume before it); it owns nothing afterwards.
    assert a.owned == set(), a.state()
    kind, partitions, where = a.changes()[-1]
    assert (kind, partitions) == ("revoke", frozenset(moving))
    assert where in {"close", "consume"}
    drive(
        k,
        [a, b],
        lambda: b.owned == {0, 1, 2, 3},
        "the survivor owning everything",
        check=disjoint(a, b),
    )
    assert b.changes()[1:] == [("assign", frozenset(moving), "consume")], b.state()
    # The survivor reads the partitions it took over (no commits: from the beginning).
    drive(k, [b], lambda: all(1 in b.eof_at(p) for p in moving), "the moved partitions' ends")
    for p in moving:
        assert b.offsets(p) == [0]
    b.close()
    assert_clean(a, b)


def test_two_members_split_the_partitions_and_hand_over_on_close(kafka: Kafka) -> None:
    kafka.run(two_members)


# ---- 7. commits by members that do not own the partition -------------------------------------


def fenced_member(k: Kafka) -> None:
    topic = k.topic(2)
    k.produce(topic, keyed(0, "a", 2) + keyed(1, "b", 1))
    everything = [TopicPartition(topic, 0), TopicPartition(topic, 1)]
    probe = Probe.subscribe(k.consumer(k.group()), topic, "c")
    drive(k, [probe], eof_everywhere(probe, {0: 2, 1: 1}), "every partition's end")
    probe.consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    probe.consumer.pause([TopicPartition(topic, 0)])

    k.stall(probe.consumer)
    # The group dropped the member: before it even hears of it, its commits fail.
    with pytest.raises(KafkaException) as failed:
        probe.consumer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    assert failed.value.args[0].code() in NOT_A_MEMBER, failed.value

    # It hears of it in consume (on_lost, not on_revoke), then joins again and is given both
    # partitions back, from the committed offsets.
    drive(
        k,
        [probe],
        lambda: any(e.kind == "lost" for e in probe.events) and probe.owned == {0, 1},
        "the partitions lost and assigned again",
    )
    assert probe.changes() == [
        ("assign", frozenset({0, 1}), "consume"),
        ("lost", frozenset({0, 1}), "consume"),
        ("assign", frozenset({0, 1}), "consume"),
    ], probe.state()
    drive(k, [probe], lambda: probe.eof_at(1) == [1, 1], "partition 1's end again")
    assert probe.offsets(1) == [0, 0]  # never committed: from the beginning
    # The application's pause outlives the assignment (librdkafka keeps it; the pipeline
    # pauses every partition it is assigned until its ledger is restored, then resumes it).
    settle(k, [probe], 0.5)
    assert probe.offsets(0) == [0, 1], "a paused partition, lost and assigned back, delivered"
    probe.consumer.resume([TopicPartition(topic, 0)])
    drive(k, [probe], lambda: probe.eof_at(0) == [2, 2], "partition 0's end after resume")
    assert probe.offsets(0) == [0, 1, 1]  # from the committed 1, not from its old position
    committed = probe.consumer.committed(everything, 10)
    assert [tp.offset for tp in committed] == [1, OFFSET_INVALID]  # the failed commit left no trace
    probe.consumer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    assert [tp.offset for tp in probe.consumer.committed(everything, 10)] == [2, OFFSET_INVALID]
    probe.close()
    assert_clean(probe)


def test_a_member_dropped_by_the_group_cannot_commit(kafka: Kafka) -> None:
    kafka.run(fenced_member)


def foreign_commit(k: Kafka) -> None:
    topic = k.topic(4)
    a, b = pair(k, topic, k.group())
    theirs = min(b.owned)
    offsets = [TopicPartition(topic, theirs, 1)]
    # A broker checks a commit's member id and generation, not who owns the partition: a live
    # member's commit of another member's partition is accepted and stored. Observed on Tansu
    # (Apache Kafka's group coordinator checks the same two things). The simulation refused
    # it until this suite showed the difference; a stricter fake hid the very bug it meant to
    # catch (the refusal undid the commit that a real broker keeps), so it now stores it too
    # and the soak's commit invariants judge it. The pipeline must filter: Committer.commit
    # commits only the partitions it owns.
    result = a.consumer.commit(offsets=offsets, asynchronous=False)
    assert [(tp.partition, tp.offset, tp.error) for tp in result] == [(theirs, 1, None)]
    assert [tp.offset for tp in b.consumer.committed(offsets, 10)] == [1]
    # Nothing was moved by it: the owner keeps the partition and commits it again.
    assert theirs in b.owned
    assert theirs not in a.owned
    b.consumer.commit(offsets=[TopicPartition(topic, theirs, 2)], asynchronous=False)
    assert [tp.offset for tp in a.consumer.committed(offsets, 10)] == [2]
    a.close()
    b.close()
    assert_clean(a, b)


def test_commit_of_a_partition_owned_by_another_member(kafka: Kafka) -> None:
    kafka.run(foreign_commit)

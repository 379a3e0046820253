"""Issue 14: one focused test per defect of the core loop, each named after its section.

Every test here failed (or hung, or crashed) when its defect was put back into the service
code; the mutation and the failure seen are recorded in the commit that added them. They
drive the real pipeline stages with fakes at the edges: a producer whose deliveries the test
acknowledges or fails one by one, a ledger reader that returns the records a test gives it,
an executor that runs nothing, and hand-written AC replies for the sans-IO calls.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry

from service.adapters.dlq import DeadLetterQueue
from service.adapters.kafka import AckedProducer, LogReader
from service.adapters.ledger_store import Intent, LedgerStore
from service.core.acapi import ApiCall, Call, Reply, imports_outstanding, run_sync
from service.core.budget import ImportBudget, LeakyBucket
from service.core.bulk import Submitted, submit_import
from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.codec import EventDecoder, encode_event, load_reader_schema
from service.core.errors import PermanentApiError, TransientApiError
from service.core.ledger import SUBSCRIBED, LedgerEntry, ListState, Plan, SetBy
from service.core.ledger_codec import LedgerCodec
from service.core.ledger_index import CompactIndex
from service.core.lists import ListDirectory, ListNamer
from service.core.model import Action, MembershipEvent
from service.core.offsets import OffsetTracker
from service.core.outcome import Outcome, OutcomeKind
from service.metrics import Metrics
from service.pipeline.confirm import Confirmer
from service.pipeline.deliver import Delivery
from service.pipeline.desk import DeliverySettings, Desk
from service.pipeline.dispatch import Dispatcher
from service.pipeline.imports import ImportLifecycle
from service.pipeline.loop import Loop
from service.pipeline.ownership import Ownership
from service.pipeline.rebalance import Rebalancer
from service.pipeline.source import Source
from service.pipeline.stages import Ports

TOPIC = "cdp.audience"
LEDGER = TOPIC + ".ledger"
DLQ = TOPIC + ".dlq"
WALL = 1_750_000_000.0  # the rig's wall clock (epoch seconds)
READER = load_reader_schema(logical_types=False)
WRITER = load_reader_schema()


# ---- fakes at the edges ------------------------------------------------------------------------


class FakeError:
    """A librdkafka error as a delivery callback sees it."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def str(self) -> str:
        return self.reason

    def code(self) -> int:
        return -1


@dataclass
class Produced:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] | None
    on_delivery: Callable[[Any, Any], None]
    answered: bool = False


class FakeProducer:
    """The ``Producer`` port: records what is produced; the test answers each delivery."""

    def __init__(self) -> None:
        self.sent: list[Produced] = []
        self.purges = 0

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
        self.sent.append(Produced(topic, partition, key, value, headers, on_delivery))

    def answer(self, index: int, error: str | None = None) -> None:
        record = self.sent[index]
        assert not record.answered
        record.answered = True
        record.on_delivery(None if error is None else FakeError(error), None)

    def ack_all(self) -> None:
        """Acknowledge everything produced so far (and what those acks produce)."""
        while True:
            waiting = [i for i, r in enumerate(self.sent) if not r.answered]
            if not waiting:
                return
            for index in waiting:
                self.answer(index)

    def to(self, topic: str) -> list[Produced]:
        return [r for r in self.sent if r.topic == topic]

    def poll(self, timeout: float = -1) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        return 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.purges += 1

    def __len__(self) -> int:
        return sum(1 for r in self.sent if not r.answered)


class ListReader:
    """A ``LogReader`` over records a test gives (all in one read)."""

    def __init__(self, records: list[tuple[int, bytes, bytes | None]]) -> None:
        self.records = records
        self.closed = False

    def read(self, max_records: int, timeout: float) -> list[tuple[int, bytes, bytes | None]]:
        found, self.records = self.records, []
        return found

    def done(self) -> bool:
        return not self.records

    def close(self) -> None:
        self.closed = True


def readers_of(records: list[tuple[int, bytes, bytes | None]]) -> Callable[..., LogReader]:
    def factory(topic: str, partitions: Sequence[int]) -> LogReader:
        return ListReader([r for r in records if r[0] in partitions])

    return factory


class FakeHandle:
    def __init__(self, call: Call[Any], cancel: threading.Event) -> None:
        self.call = call
        self.cancel = cancel

    def done(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        raise AssertionError("never done")


class FakeExecutor:
    """Runs nothing: the test looks at what was submitted."""

    def __init__(self) -> None:
        self.handles: list[FakeHandle] = []

    def submit(self, call: Call[Any], cancel: threading.Event) -> FakeHandle:
        handle = FakeHandle(call, cancel)
        self.handles.append(handle)
        return handle

    def shutdown(self) -> None:
        return None


# ---- values ------------------------------------------------------------------------------------


def event(
    email: str = "a@example.com",
    audience: str = "VIP",
    action: Action = Action.ENTERED,
    event_id: str = "ev-1",
    occurred_ms: int = 1_700_000_000_000,
) -> MembershipEvent:
    return MembershipEvent(event_id, occurred_ms, email, "aud-" + audience, audience, action)


def state(
    label: str = "VIP",
    status: int = 1,
    offset: int = 10,
    event_id: str = "ev-1",
    applied_ms: int = 1_700_000_000_500,
    **more: Any,
) -> ListState:
    base = ListState(
        label,
        status,
        SetBy.SERVICE,
        event_id,
        1_700_000_000_000,
        applied_ms,
        0,
        offset,
        "aud-" + label,
        label,
        verified=True,
    )
    return base._replace(**more)


def avro(value: dict[str, Any]) -> bytes:
    record = {
        "event_id": "ev-1",
        "occurred_at": 1_700_000_000_000,
        "email": "a@example.com",
        "audience_id": "aud-VIP",
        "audience_name": "VIP",
        "campaign_id": None,
        "treatment_group": None,
        "action": "ENTERED",
        "attributes": {},
    }
    record.update(value)
    return encode_event(record, WRITER)


def ok(body: object) -> Reply:
    return Reply(200, "application/json", json.dumps(body).encode())


def refused(status: int, code: str, pointer: str) -> Reply:
    body = {"errors": [{"title": code, "code": code, "source": {"pointer": pointer}}]}
    return Reply(status, "application/json", json.dumps(body).encode())


def drive(call: Call[Any], replies: Iterator[Reply]) -> tuple[Any, list[ApiCall]]:
    """Run a sans-IO call against scripted replies; what it returned and what it sent."""
    sent: list[ApiCall] = []

    def send(request: ApiCall) -> Reply:
        sent.append(request)
        return next(replies)

    return run_sync(call, send), sent


# ---- the rig: the delivery stages on fakes ------------------------------------------------------


class FakeConsumer:
    """The consumer as the rebalance stage uses it (inside and right after ``consume``)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.paused: set[int] = set()

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {tp.partition for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {tp.partition for tp in partitions}

    def committed(
        self, partitions: list[TopicPartition], timeout: float = -1
    ) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        partitions = dict.fromkeys(range(self.total))
        return mock.Mock(topics={TOPIC: mock.Mock(partitions=partitions)})


class Rig:
    """Confirmer, desk and delivery of one replica that owns partition 0 (ledger loaded)."""

    def __init__(
        self,
        *,
        give_up_after: float = 600.0,
        create_lists: bool = True,
        records: list[tuple[int, bytes, bytes | None]] | None = None,
        partitions: Sequence[int] = (0,),
    ) -> None:
        self.now = 100.0
        self.wall = WALL
        self.producer = FakeProducer()
        self.acked = AckedProducer(self.producer, sleep=lambda seconds: None)
        self.ledger = LedgerStore(
            LEDGER, self.acked, readers_of(records or []), clock=lambda: self.now
        )
        self.ownership = Ownership()
        self.ownership.assign(partitions)
        for partition in partitions:
            self.ownership.restored(partition)
        self.tracker = OffsetTracker()
        self.coalescer = Coalescer(1.0)
        self.metrics = Metrics(CollectorRegistry())
        self.confirm = Confirmer(
            TOPIC,
            self.coalescer,
            self.tracker,
            self.ledger,
            DeadLetterQueue(self.acked, DLQ, lambda: self.wall),
            self.ownership,
            self.metrics,
            lambda email: email[:3],
            lambda: self.wall,
            random.Random(7),
            retry_cap=60.0,
            give_up_after=give_up_after,
        )
        self.executor = FakeExecutor()
        self.dispatcher = Dispatcher(self.executor, 4)
        self.desk = Desk(
            DeliverySettings(4, False, 10, create_lists, "https://lists.test", "r", {}, {}),
            self.coalescer,
            self.ledger,
            ListDirectory(),
            self.dispatcher,
            self.confirm,
            self.ownership,
            self.metrics,
            lambda: self.wall,
            lambda: self.now,
        )
        self.lifecycle = ImportLifecycle(ImportBudget(), 600.0, random.Random(1), lambda: "imp-1")
        self.delivery = Delivery(self.desk, self.lifecycle)
        self._offsets = iter(range(10_000))

    def change(
        self, email: str = "a@example.com", audience: str = "VIP", **kw: Any
    ) -> PendingChange:
        """A pending change of partition 0 whose source offset is tracked."""
        offset = next(self._offsets)
        assert self.tracker.track(0, offset)
        ev = event(email, audience, **kw)
        return PendingChange(
            0, email, ListRef(audience), ev, b"raw", [offset], self.now, self.now + 1.0
        )

    def committable(self) -> int:
        return self.tracker.committable()[0]

    def rebalancer(self, *, total: int = 2, requests: LeakyBucket | None = None) -> Rebalancer:
        """The rebalance stage over the rig's parts (the source and the committer are mocks:
        it only tells them to forget)."""
        from service.pipeline.flow import Pauses

        self.consumer = FakeConsumer(total)
        self.requests = requests or LeakyBucket(5.0)
        rebalancer = Rebalancer(
            TOPIC,
            True,
            self.consumer,  # type: ignore[arg-type]
            self.ownership,
            Pauses(TOPIC, self.consumer),
            self.tracker,
            self.coalescer,
            mock.MagicMock(),  # source
            self.delivery,
            self.dispatcher,
            self.ledger,
            self.acked,
            mock.MagicMock(),  # committer
            self.lifecycle.budget,
            self.requests,
            self.metrics,
            lambda: self.now,
            lambda seconds: None,
            10.0,
            lambda now: None,
            total_partitions=total,
        )
        rebalancer._share(refresh=False, now=self.now)
        return rebalancer

    def letters(self) -> list[dict[str, str]]:
        return [{k: v.decode() for k, v in r.headers or []} for r in self.producer.to(DLQ)]


class FixedClock:
    def monotonic(self) -> float:
        return 100.0

    def wall(self) -> float:
        return WALL

    def sleep(self, seconds: float) -> None:
        return None


def loop_of(*, max_tracked: int) -> Loop:
    """The whole loop of one replica on fakes (nothing is consumed: tests call its stages)."""
    from service.app.settings import Settings

    settings = Settings(
        kafka_bootstrap_servers="fake",
        kafka_topic=TOPIC,
        kafka_dlq_topic=DLQ,
        kafka_ledger_topic=LEDGER,
        ac_api_url="http://ac.test",
        ac_list_sender_url="https://lists.test",
        max_tracked_offsets=max_tracked,
    )
    ports = Ports(
        consumer=FakeConsumer(2),  # type: ignore[arg-type]
        producer=AckedProducer(FakeProducer(), sleep=lambda seconds: None),
        readers=readers_of([]),
        executor=FakeExecutor(),
        requests=LeakyBucket(5.0),
        decoder=EventDecoder(READER),
        clock=FixedClock(),
        rng=random.Random(3),
    )
    return Loop(settings, ports, Metrics(CollectorRegistry()), lambda email: email[:3])


def ledger_value(entry: LedgerEntry) -> bytes:
    return LedgerCodec().encode(entry)


# ---- §1 crash loop on valid data ---------------------------------------------------------------


def test_issue14_1_a_300_list_email_with_a_70000_byte_event_id_is_recorded_and_restored() -> None:
    """Issue 14 §1: the packed index held at most 255 lists per email (">QqB") and event ids
    under 65,535 bytes; recording a change past either raised on the main loop, on the same
    record after every restart. Now a change with a 70,000-byte event id (a valid record: the
    decoder accepts it) is recorded into an entry that already holds 299 lists, and the
    ledger record written restores to the same 300 lists."""
    rig = Rig()
    others = tuple(state(f"L{i}", offset=i) for i in range(299))
    rig.ledger.index.put(0, "a@example.com", LedgerEntry("42", 0, others))
    decoded = EventDecoder(READER).decode_batch([avro({"event_id": "x" * 70_000})])[0]
    assert isinstance(decoded, MembershipEvent) and len(decoded.event_id) == 70_000
    change = rig.change()
    change.event = decoded
    change.plan = Plan.FIRST_ENTRY
    rig.confirm.record([change], {0: SUBSCRIBED}, rig.ownership.generation(0))
    [write] = rig.producer.to(LEDGER)
    rig.producer.ack_all()
    assert rig.committable() == 1  # the change's offset completed on the ledger's ack
    restored = LedgerStore(
        LEDGER, rig.acked, readers_of([(0, write.key or b"", write.value)]), clock=lambda: 0.0
    )
    restored.start_restore([0])
    assert restored.restore_step(1.0) is not None
    entry = restored.get(0, "a@example.com")
    assert entry is not None and len(entry.lists) == 300
    vip = entry.state("VIP")
    assert vip is not None and vip.event_id == "x" * 70_000 and vip.status == 1


@dataclass
class FakeMessage:
    """A consumed record (the ``Message`` port)."""

    partition_: int
    offset_: int
    value_: bytes | None
    key_: bytes | None = b"a@example.com"

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self.partition_

    def offset(self) -> int:
        return self.offset_

    def key(self) -> bytes | None:
        return self.key_

    def value(self) -> bytes | None:
        return self.value_

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def headers(self) -> None:
        return None


def source_of(rig: Rig) -> Source:
    return Source(
        TOPIC,
        rig.tracker,
        rig.coalescer,
        EventDecoder(READER),
        ListNamer("{audience_name}", {}),
        rig.confirm,
        rig.ownership,
        rig.metrics,
        lambda: rig.wall,
        lambda partition, reason: None,
        lambda partition, reason: None,
        lambda ref: None,
    )


def test_issue14_1_a_record_the_ledger_could_not_hold_is_parked_with_its_reason() -> None:
    """Issue 14 §1: anything a ledger record cannot represent is refused when the source
    record is decoded, with a dead-letter reason, instead of reaching the ledger and raising
    there for ever. An event id that is not UTF-8 (the ledger stores text) is parked as
    ``undecodable``, its offset completed on the dead letter's ack; the valid records around
    it (one with a 70,000-byte event id) are coalesced."""
    rig = Rig()
    good = avro({"event_id": "y" * 70_000})
    short = avro({"event_id": "ab\u00e9cd"})
    not_utf8 = short.replace("\u00e9".encode(), b"\xc3\x28")
    source = source_of(rig)
    source.ingest([FakeMessage(0, 0, not_utf8), FakeMessage(0, 1, good)], rig.now)
    assert len(rig.coalescer) == 1  # the valid record, pending
    [letter] = rig.letters()
    assert letter["dlq.reason"] == "undecodable"
    assert letter["dlq.source.offset"] == "0"
    assert rig.committable() == 0
    rig.producer.ack_all()
    assert rig.committable() == 1  # parked: done; the valid record's change is still pending
    for value in (good, short):  # every record the decoder accepts fits the ledger's index
        decoded = EventDecoder(READER).decode_batch([value])[0]
        assert isinstance(decoded, MembershipEvent)
        packed = CompactIndex()
        packed.put(0, "a@example.com", LedgerEntry(None, 0, (state(event_id=decoded.event_id),)))
        assert packed.get(0, "a@example.com") is not None


# ---- §2 a restart stacks a second import burst ----------------------------------------------


def drain_imports(budget: ImportBudget, now: float) -> int:
    """Imports the budget lets start at ``now``."""
    taken = 0
    while budget.available(now) and taken < 1000:
        budget.take(now)
        taken += 1
    return taken


def previous_owner_burst(partitions: int, t0: float) -> dict[int, list[tuple[float, float]]]:
    """A replica that owned every partition spent a quiet minute's burst at ``t0`` (AC's 100
    less the margin: 98 imports); its per-partition history, as its ledger records hold it."""
    previous = ImportBudget(per_minute=100)
    previous.share(frozenset(range(partitions)), partitions)
    for partition in range(partitions):
        previous.adopt(partition, [])
    charges = [previous.take(t0)[0] for _ in range(98)]
    assert not previous.available(t0)
    for charge in charges:
        previous.settle(charge, t0 + 0.2)
    return {p: previous.history(p, t0 + 1.0) for p in range(partitions)}


@pytest.mark.parametrize("share_first", [True, False], ids=["share-then-adopt", "adopt-then-share"])
def test_issue14_2_a_new_owner_adopts_the_minute_its_partitions_already_spent(
    share_first: bool,
) -> None:
    """Issue 14 §2: the import budget adopted the previous owner's history before the share
    gave the partition count, so each charge counted 1/P of an import and a restart sent a
    second burst into AC's minute. 98 imports recorded in the last minute by a previous owner
    of 6 partitions: the next owner of all 6 may start at most 2 more in that minute (AC's
    100 less those 98; the service's own margin leaves 0), whichever of ``share`` and
    ``adopt`` comes first (``share`` rescales histories already adopted)."""
    t0 = WALL
    ledger = previous_owner_burst(6, t0)
    budget = ImportBudget(per_minute=100)
    if share_first:  # what ``Rebalancer.settle`` does: the share, then the restore's adopt
        budget.share(frozenset(range(6)), 6)
    for partition, history in ledger.items():
        budget.adopt(partition, history)
    if not share_first:
        budget.share(frozenset(range(6)), 6)
    assert drain_imports(budget, t0 + 10.0) <= 2
    assert drain_imports(budget, t0 + 61.0) > 0  # the minute is over: the budget is back


def test_issue14_2_an_owner_of_some_partitions_gets_no_more_than_they_have_left() -> None:
    """Issue 14 §2: the same for a replica that takes over half of the partitions (a scale-up
    right after a burst): together with the other half's owner, still at most AC's 100."""
    t0 = WALL
    ledger = previous_owner_burst(6, t0)
    halves = [ImportBudget(per_minute=100), ImportBudget(per_minute=100)]
    for half, owned in zip(halves, ({0, 1, 2}, {3, 4, 5}), strict=True):
        half.share(frozenset(owned), 6)
        for partition in owned:
            half.adopt(partition, ledger[partition])
    assert sum(drain_imports(half, t0 + 10.0) for half in halves) <= 2


# ---- §3 stale ledger records win compaction --------------------------------------------------


def written_offsets(producer: FakeProducer, key: bytes) -> list[int]:
    """The source offset of the VIP state of every ledger value produced for ``key``, in
    produce order (what lands in the log, partition order being produce order)."""
    codec = LedgerCodec()
    found = []
    for record in producer.to(LEDGER):
        if record.key == key and record.value is not None:
            vip = codec.decode(record.value).state("VIP")
            assert vip is not None
            found.append(vip.source_offset)
    return found


def test_issue14_3_a_failed_ledger_write_never_lands_after_a_newer_one_of_its_key() -> None:
    """Issue 14 §3: a failed ledger write was retried as the same record after a newer write
    of the same email had been produced, so the older value landed last and compaction kept
    it. Now the newer write covers the failed one: it is never produced again, nothing older
    follows the newer value, and the completions of both run on the newer one's ack."""
    producer = FakeProducer()
    acked = AckedProducer(producer, sleep=lambda seconds: None)
    store = LedgerStore(LEDGER, acked, readers_of([]), clock=lambda: 0.0)
    done: list[str] = []
    store.write(
        0, "a@example.com", LedgerEntry(None, 0, (state(offset=1),)), lambda: done.append("1")
    )
    store.write(
        0, "a@example.com", LedgerEntry(None, 0, (state(offset=2),)), lambda: done.append("2")
    )
    producer.answer(0, error="Local: Message timed out")  # the first write failed
    acked.poll()  # (a resend would be produced here)
    producer.ack_all()
    acked.poll()
    assert written_offsets(producer, b"a@example.com") == [1, 2]
    assert done == ["1", "2"]
    # A failure with no newer write on its way resends: the latest value, not an older one.
    store.write(
        0, "a@example.com", LedgerEntry(None, 0, (state(offset=3),)), lambda: done.append("3")
    )
    producer.answer(len(producer.sent) - 1, error="Local: Message timed out")
    acked.poll()
    producer.ack_all()
    assert written_offsets(producer, b"a@example.com") == [1, 2, 3, 3]
    assert done == ["1", "2", "3"]


def test_issue14_3_nothing_of_a_handed_over_partition_is_written_after_the_hand_over() -> None:
    """Issue 14 §3: a write of a partition handed over (revoked or lost) must never land after
    the new owner restored the partition. A write that fails after the hand-over is not
    retried, and the hand-over purges what librdkafka has not sent yet."""
    rig = Rig(partitions=[0, 1])
    producer, acked, store = rig.producer, rig.acked, rig.ledger
    done: list[str] = []
    store.write(
        0, "a@example.com", LedgerEntry(None, 0, (state(offset=1),)), lambda: done.append("a")
    )
    store.write(
        1, "b@example.com", LedgerEntry(None, 0, (state(offset=1),)), lambda: done.append("b")
    )
    rig.rebalancer().on_lost(None, [TopicPartition(TOPIC, 0)])
    assert producer.purges == 1  # unsent records dropped
    producer.answer(0, error="Local: Purged in queue")
    producer.answer(1, error="Local: Message timed out")
    acked.poll()
    assert [r.partition for r in producer.to(LEDGER)] == [0, 1, 1]  # partition 1 retried only
    producer.ack_all()
    assert done == ["b"]


def test_issue14_3_restore_keeps_the_newest_state_whatever_the_log_order() -> None:
    """Issue 14 §3: restore must not let an older entry replace a newer one. A log holding the
    newer record first and an older one after it (a write that landed late) restores to the
    newer state, and the merged entry is written again so that compaction keeps it."""
    newer = LedgerEntry("7", 0, (state(status=2, offset=20, applied_ms=2_000),))
    older = LedgerEntry(None, 0, (state(status=1, offset=10, applied_ms=1_000),))
    key = b"a@example.com"
    producer = FakeProducer()
    store = LedgerStore(
        LEDGER,
        AckedProducer(producer, sleep=lambda seconds: None),
        readers_of([(0, key, ledger_value(newer)), (0, key, ledger_value(older))]),
        clock=lambda: 0.0,
    )
    store.start_restore([0])
    stats = store.restore_step(1.0)
    assert stats is not None and stats.repaired == 1
    restored = store.get(0, "a@example.com")
    assert restored is not None and restored.state("VIP") == newer.lists[0]
    assert restored.contact_id == "7"
    [rewrite] = producer.to(LEDGER)
    assert rewrite.key == key and rewrite.partition == 0
    assert LedgerCodec().decode(rewrite.value or b"") == restored


def test_issue14_3_the_ledger_producer_is_idempotent() -> None:
    """Issue 14 §3: librdkafka's own retries may reorder and duplicate records unless the
    producer is idempotent: the one the ledger and the DLQ share has enable.idempotence on,
    with acks from all replicas, whatever the user's properties say."""
    from service.app.settings_loader import load_settings

    settings = load_settings(
        {
            "KAFKA_BOOTSTRAP_SERVERS": "localhost:9092",
            "KAFKA_TOPIC": TOPIC,
            "AC_API_URL": "https://acct.api-us1.com",
            "AC_API_TOKEN": "s3cret-token-value",
            "AC_LIST_SENDER_URL": "https://www.acme-corp.test",
            "KAFKA_PROPERTY_ENABLE_IDEMPOTENCE": "false",
            "KAFKA_PROPERTY_ACKS": "1",
        }
    )
    config = settings.producer_config()
    assert config["enable.idempotence"] is True
    assert config["acks"] == "all"


# ---- §4 an old import lands after a newer change ---------------------------------------------


def import_of(rig: Rig, emails: Sequence[str]) -> tuple[str, list[PendingChange], Any]:
    """An import of first entries for ``emails`` (partition 0), written ahead and acked: its
    request may leave. Returns its id, its changes and its entries."""
    from service.core.bulk import contact_entry
    from service.pipeline.import_actions import Group

    changes = []
    for email in emails:
        change = rig.change(email)
        change.plan = Plan.FIRST_ENTRY
        changes.append(change)
    groups = [Group(c.email, 0, [c]) for c in changes]
    entries = [contact_entry(c.email, {"11": 1}, {}, {}) for c in changes]
    imp, actions = rig.lifecycle.prepare(groups, entries, {0: 1}, rig.now, rig.wall)
    assert [type(a).__name__ for a in actions] == ["WriteIntent"]
    assert rig.lifecycle.acked(imp.import_id)  # the intent is on the broker: it may leave
    return imp.import_id, changes, entries


def kinds(actions: Sequence[Any]) -> list[str]:
    return [type(a).__name__ for a in actions]


def released(actions: Sequence[Any]) -> set[str]:
    from service.pipeline.import_actions import Release

    return {e for a in actions if isinstance(a, Release) for e in a.emails}


def summary(rig: Rig, batches: int, at: float) -> list[Any]:
    """AC's import summary, asked and answered at ``at``."""
    lifecycle = rig.lifecycle
    assert lifecycle.summary_due(at)
    lifecycle.asking_summary(at)
    answer = ok({"outstanding": [{"forDate": "2026-01-01", "batches": str(batches)}]})
    count, _ = drive(imports_outstanding(), iter([answer]))
    return lifecycle.summarized(count, at)


def test_issue14_4_an_import_whose_request_timed_out_keeps_its_emails_until_ac_says() -> None:
    """Issue 14 §4: a client timeout of ``bulk_import`` released the import's emails though AC
    may have queued it, so a newer change could be written before the old import landed.
    Now the import is UNKNOWN: its emails stay held (no Release, no resend) while AC's summary
    reports imports outstanding, and are sent again only once AC reports none."""
    from service.pipeline.import_actions import State

    rig = Rig()
    import_id, changes, entries = import_of(rig, ["a@example.com", "b@example.com"])
    result, sent = drive(submit_import(entries), iter([Reply(failure="timeout")]))
    assert len(sent) == 1 and isinstance(result, Submitted)
    assert isinstance(result.error, TransientApiError)
    actions = rig.lifecycle.submitted(import_id, result, rig.now, rig.wall)
    assert kinds(actions) == []
    assert rig.lifecycle.imports[import_id].state is State.UNKNOWN
    assert rig.lifecycle.busy_emails() == {"a@example.com", "b@example.com"}
    assert rig.lifecycle.touches({0})  # a revoke waits for it too
    assert released(summary(rig, 1, rig.now + 1.0)) == set()  # AC still has one to process
    assert rig.lifecycle.busy_emails() == {"a@example.com", "b@example.com"}
    actions = summary(rig, 0, rig.now + 6.0)  # nothing outstanding: it landed or never will
    assert kinds(actions) == ["Requeue", "DeleteIntent", "Release"]
    assert released(actions) == {"a@example.com", "b@example.com"}
    assert actions[0].changes == changes


def test_issue14_4_a_previous_owners_import_blocks_its_emails_until_its_outcome_is_known() -> None:
    """Issue 14 §4: across a revoke or a crash, the next owner did not know the previous
    owner's imports and wrote to their emails while those could still land. Now the intents
    found in the restored ledger (``import/<id>`` keys) are adopted: their emails are held
    from the delivery stage until ``import/info`` says the import completed (with a batch
    id) or AC's summary says nothing is outstanding (without one)."""
    queued = Intent("imp-9", "batch-9", ("c@example.com",), WALL - 5.0)
    unsent = Intent("imp-8", None, ("d@example.com",), WALL - 5.0)
    records = [
        (0, b"import/imp-9", queued.encode()),
        (0, b"import/imp-8", unsent.encode()),
    ]
    rig = Rig(partitions=[], records=records)
    rebalancer = rig.rebalancer(total=1)
    rebalancer.on_assign(None, [TopicPartition(TOPIC, 0)])
    rebalancer.settle(rig.now)  # share, committed offsets, restore: the intents are adopted
    assert rig.ownership.ready(0)
    assert rig.desk.adopted == {"c@example.com", "d@example.com"}
    for email in ("c@example.com", "d@example.com"):
        rig.coalescer.add(0, ListRef("VIP"), event(email), b"raw", 0, rig.now)
    rig.desk.directory.learn(ListRef("VIP"), "11", rig.now)
    rig.delivery.step(rig.now + 5.0)  # due, but held: only the import/info and the summary
    assert len(rig.coalescer) == 2
    assert sorted(type(t).__name__ for t in rig.dispatcher.inflight.values()) == [
        "PollTask",
        "SummaryTask",
    ]
    by_kind = {type(t).__name__: (h, t) for h, t in rig.dispatcher.inflight.items()}
    answers = {
        "PollTask": (ok({"status": "completed", "success": ["5"], "failure": []}), "d@example.com"),
        "SummaryTask": (ok({"outstanding": []}), None),
    }
    for kind in ("PollTask", "SummaryTask"):  # import/info, then AC's summary
        handle, task = by_kind[kind]
        reply, still_held = answers[kind]
        result, _ = drive(handle.call, iter([reply]))
        del rig.dispatcher.inflight[handle]
        rig.delivery.completed(task, result, rig.now + 6.0)
        assert rig.desk.adopted == ({still_held} if still_held else set())
    taken = rig.coalescer.take_due(rig.now + 7.0, limit=10, busy=rig.delivery.busy())
    assert sorted(g[0].email for g in taken) == ["c@example.com", "d@example.com"]


# ---- §5 partitions that stall for ever, memory without bound ---------------------------------


def retried_at(rig: Rig, email: str) -> tuple[float, PendingChange]:
    """Take ``email``'s change back out of the coalescer (where a retry put it): when it is
    due, and the change."""
    groups = rig.coalescer.take_due(float("inf"), limit=100, busy=set(), flush_all=True)
    [group] = [g for g in groups if g[0].email == email]
    [change] = group
    return change.due_at, change


def test_issue14_5_a_change_failing_while_ac_works_for_others_is_parked_not_retried_for_ever() -> (
    None
):
    """Issue 14 §5: one contact that AC always answers with a 5xx held its partition's commit
    point for ever (transient errors were retried without a cap). Now, once it has failed for
    ``RETRY_GIVE_UP_SECONDS`` while AC confirmed other changes meanwhile, it is parked with
    ``retries_exhausted`` and its offset completes on the dead letter's ack. During an outage
    (AC confirms nothing) it keeps being retried: nothing is parked for AC's own failure."""
    rig = Rig(give_up_after=600.0)
    stuck, other = rig.change("stuck@example.com"), rig.change("other@example.com")
    error = TransientApiError(503, "server answered 503")
    generation = rig.ownership.generation(0)
    rig.confirm.failed(Outcome(stuck, OutcomeKind.RETRY, error=error), generation, rig.now)
    rig.now += 700.0  # an outage: nobody succeeded since it first failed
    _, stuck = retried_at(rig, "stuck@example.com")
    rig.confirm.failed(Outcome(stuck, OutcomeKind.RETRY, error=error), generation, rig.now)
    assert rig.letters() == []  # not parked during an outage
    other.plan = Plan.FIRST_ENTRY  # AC works for another contact meanwhile
    applied = Outcome(other, OutcomeKind.APPLIED, SUBSCRIBED, contact_id="9")
    rig.confirm.settle([applied], generation, rig.now + 1.0)
    rig.now += 5.0
    _, stuck = retried_at(rig, "stuck@example.com")
    rig.confirm.failed(Outcome(stuck, OutcomeKind.RETRY, error=error), generation, rig.now)
    [letter] = rig.letters()
    assert letter["dlq.reason"] == "retries_exhausted"
    assert letter["dlq.source.offset"] == "0"
    assert len(rig.coalescer) == 0  # not requeued
    rig.producer.ack_all()
    assert rig.committable() == 2  # the commit point passes both


def test_issue14_5_a_consent_read_that_keeps_failing_backs_off_and_gives_up() -> None:
    """Issue 14 §5: a consent read (is this exiting person still subscribed?) that AC refused
    for good was retried every second for ever. Now a refused read is retried with an
    exponential back-off (capped), and parked like any change once it has failed for
    ``RETRY_GIVE_UP_SECONDS`` while AC worked for others."""
    from service.pipeline.dispatch import VerifyTask

    rig = Rig(give_up_after=600.0)
    change = rig.change(action=Action.EXITED)
    change.plan = Plan.EXIT
    refused_read = PermanentApiError(400, "invalid", "filters refused", {})
    generation = rig.ownership.generation(0)
    delays = []
    for _ in range(8):
        task = VerifyTask(ListRef("VIP"), "11", [(generation, [change])])
        rig.delivery.verification.verified(task, refused_read, rig.now)
        due, change = retried_at(rig, "a@example.com")
        delays.append(due - rig.now)
        rig.now = due
    assert rig.letters() == []  # a refused read parks nothing by itself
    assert all(later > earlier for earlier, later in itertools.pairwise(delays[:5]))
    assert sum(delays) > 60.0  # not once a second: eight failures take over a minute
    assert max(delays) <= 60.0  # capped (RETRY_MAX_BACKOFF_SECONDS)
    rig.confirm.last_success = rig.now  # AC works for others
    rig.now += 601.0
    task = VerifyTask(ListRef("VIP"), "11", [(generation, [change])])
    rig.delivery.verification.verified(task, refused_read, rig.now)
    [letter] = rig.letters()
    assert letter["dlq.reason"] == "retries_exhausted"


def test_issue14_5_a_stuck_commit_point_pauses_its_partition() -> None:
    """Issue 14 §5: while a partition's commit point was stuck, every offset consumed after it
    stayed tracked, without bound. Now tracked offsets count for back-pressure: a partition
    holding more than its part of ``MAX_TRACKED_OFFSETS`` is paused (the others go on), all
    are paused above the bound, and they resume once the commit point moves."""
    loop = loop_of(max_tracked=100)
    consumer = loop.consumer
    loop.ownership.assign([0, 1])
    for offset in range(60):  # partition 0's head never completes: more than its half of 100
        loop.tracker.track(0, offset)
    for offset in range(5):
        loop.tracker.track(1, offset)
    loop.backpressure.apply()
    assert consumer.paused == {0}  # type: ignore[attr-defined]
    for offset in range(60, 100):
        loop.tracker.track(0, offset)
    loop.backpressure.apply()
    assert consumer.paused == {0, 1}  # type: ignore[attr-defined]
    for offset in range(100):  # the head completes: the tracker empties
        loop.tracker.complete(0, offset)
    loop.backpressure.apply()
    assert consumer.paused == set()  # type: ignore[attr-defined]


def test_issue14_5_an_import_refusal_naming_no_contact_of_it_is_not_sent_again() -> None:
    """Issue 14 §5: AC refused an import naming a ``failureReasons`` index outside it, and the
    same import was resent for ever. Now the request is sent once; its contacts go per
    contact (where AC names each one's error), the import is closed and its emails released."""
    rig = Rig()
    import_id, changes, entries = import_of(rig, ["a@example.com", "b@example.com"])
    body = {"success": 0, "message": "did not pass", "failureReasons": [{"contact": 7}]}
    refusal = Reply(400, "application/json", json.dumps(body).encode())
    sent: list[ApiCall] = []

    def send(request: ApiCall) -> Reply:
        sent.append(request)
        assert len(sent) == 1, "the same import was sent again"
        return refusal

    result = run_sync(submit_import(entries), send)
    actions = rig.lifecycle.submitted(import_id, result, rig.now, rig.wall)
    assert kinds(actions) == ["Requeue", "DeleteIntent", "Release"]
    assert actions[0].force_single and actions[0].changes == changes
    assert rig.lifecycle.outstanding() == 0


def test_issue14_5_import_info_errors_back_off_and_stop_at_the_import_timeout() -> None:
    """Issue 14 §5: ``import/info`` errors were retried at a fixed pace, for ever. Now each
    error backs the next poll off (capped, a Retry-After honoured), and past the import
    timeout the import is no longer polled."""
    from service.core.errors import RateLimited

    rig = Rig()
    import_id, _changes, _entries = import_of(rig, ["a@example.com"])
    rig.lifecycle.submitted(import_id, Submitted("batch-1", [0], [], None, 1), rig.now, rig.wall)
    imp = rig.lifecycle.imports[import_id]
    rig.now = imp.next_poll_at
    rig.lifecycle.polling(imp, rig.now)
    assert rig.lifecycle.polled(import_id, RateLimited(45.0), rig.now) == []
    assert imp.next_poll_at - rig.now >= 45.0  # AC's Retry-After
    delays = []
    for _ in range(6):
        rig.now = imp.next_poll_at
        assert imp in rig.lifecycle.polls_due(rig.now)
        rig.lifecycle.polling(imp, rig.now)
        actions = rig.lifecycle.polled(import_id, TransientApiError(502, "bad gateway"), rig.now)
        assert actions == []
        delays.append(imp.next_poll_at - rig.now)
    assert all(later > earlier for earlier, later in itertools.pairwise(delays))
    assert delays[-1] <= 60.0
    rig.now = rig.lifecycle.imports[import_id].started + 601.0  # past IMPORT_TIMEOUT_SECONDS
    rig.lifecycle.polled(import_id, TransientApiError(502, "bad gateway"), rig.now)
    assert rig.lifecycle.polls_due(rig.now + 3600.0) == []


class EndlessReader:
    """A ledger partition that takes long to read: records keep coming, each read advances
    the clock by 10 ms. It refuses to be read past 1,000 reads (a restore with no bound)."""

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock
        self.reads = 0

    def read(self, max_records: int, timeout: float) -> list[tuple[int, bytes, bytes | None]]:
        self.reads += 1
        assert self.reads <= 1000, "the restore step never returned"
        self.clock[0] += 0.01
        email = f"p{self.reads}@example.com".encode()
        return [(0, email, ledger_value(LedgerEntry(None, 0, (state(),))))]

    def done(self) -> bool:
        return False

    def close(self) -> None:
        return None


def test_issue14_5_a_long_ledger_restore_holds_the_loop_only_a_slice_at_a_time() -> None:
    """Issue 14 §5: the ledger restore read a partition to its end in one go, holding the
    loop (no heartbeat, no rebalance callbacks) for as long as the ledger took. Now each
    ``restore_step`` reads for at most its slice of time and returns; the partition stays
    restoring (its records wait) until a later step reaches the end."""
    clock = [0.0]
    reader = EndlessReader(clock)
    store = LedgerStore(
        LEDGER,
        AckedProducer(FakeProducer(), sleep=lambda seconds: None),
        lambda topic, partitions: reader,
        clock=lambda: clock[0],
    )
    store.start_restore([0])
    for _ in range(3):
        before = reader.reads
        assert store.restore_step(0.05) is None
        assert reader.reads - before <= 6  # 50 ms of reading, 10 ms a read
    assert store.restoring == [0]


# ---- §6 more than 5 requests a second ----------------------------------------------------------


def test_issue14_6_lost_partitions_cancel_their_work_and_take_back_their_ticks() -> None:
    """Issue 14 §6: on a lost assignment the work in flight for those partitions went on
    sending, and a replica left owning no partition sent off-tick, into ticks that now belong
    to another replica. Now ``on_lost`` cancels that work (its next request is never sent:
    the call sees ``cancelled``) and gives the ticks up: with no partition left, the request
    budget has no slot at all; work of a partition still owned goes on."""
    from service.adapters.executor import drive as execute
    from service.core.contact import apply_contact
    from service.pipeline.dispatch import ApplyTask

    rig = Rig(partitions=[0, 1])
    rebalancer = rig.rebalancer(total=2)
    assert rig.requests.reserve(0.0) < float("inf")
    calls = {}
    for partition, email in ((0, "a@example.com"), (1, "b@example.com")):
        change = rig.change(email)
        change.partition = partition
        change.plan = Plan.FIRST_ENTRY
        task = ApplyTask(email, partition, rig.ownership.generation(partition), [change], 0)
        rig.dispatcher.submit(
            task, apply_contact(email, [change], {change.target: "11"}, "5", None)
        )
        calls[partition] = (task, rig.executor.handles[-1])
    rebalancer.on_lost(None, [TopicPartition(TOPIC, 0)])
    assert calls[0][0].cancel.is_set() and not calls[1][0].cancel.is_set()
    ticks = {round(rig.requests.reserve(t) / rig.requests.interval) % 2 for t in range(0, 20)}
    assert ticks == {1}  # only partition 1's ticks are left
    sent: list[ApiCall] = []

    def send(request: ApiCall) -> Reply:
        sent.append(request)
        return ok({"contactLists": []})

    handle = calls[0][1]
    outcomes = execute(handle.call, send, handle.cancel)
    assert sent == []  # nothing more left for the lost partition
    assert [o.kind for o in outcomes] == [OutcomeKind.RETRY]
    rebalancer.on_lost(None, [TopicPartition(TOPIC, 1)])
    assert rig.requests.reserve(1000.0) == float("inf")  # owns nothing: no slot, ever


def test_issue14_6_the_operators_tools_send_only_in_the_ticks_kept_for_them() -> None:
    """Issue 14 §6: ``reconcile`` built a limiter of its own at the full rate, on top of the
    running service's 5/s. Now the tools' client owns only every ``AC_TOOLS_TICK_EVERY``-th
    tick of the account's budget, and the service's partitions never own those."""
    from service.adapters.ac_http import AcTool
    from service.core.budget import TOOLS

    tool = AcTool(
        "http://127.0.0.1:9/api/3",
        lambda: "token",
        rate=5.0,
        guard=0.04,
        tools_every=20,
        timeout=1.0,
    )
    try:
        bucket = tool.limiter.bucket
        assert bucket.owned == frozenset({TOOLS})
        tool_ticks = [round(bucket.reserve(0.0) / bucket.interval) for _ in range(3)]
        assert tool_ticks == [19, 39, 59]
    finally:
        tool.close()
    service = LeakyBucket(5.0, 0.04, tools_every=20)
    service.share(frozenset(range(3)), 3)
    service_ticks = {round(service.reserve(0.0) / service.interval) for _ in range(57)}
    assert service_ticks.isdisjoint({19, 39, 59}) and max(service_ticks) == 59 - 1


# ---- §7 valid changes parked with an unrelated list's error ---------------------------------


def test_issue14_7_one_lists_error_fails_only_that_lists_change() -> None:
    """Issue 14 §7: one list's permanent error parked the email's whole group. Now each change
    gets its own outcome: list A answers ``related_missing`` on the list (deleted in AC), so
    only A's change is retried after the list is resolved again (``list_gone``); list B's
    EXITED is applied (AC still had the person subscribed: status 2 sent, ours, verified)."""
    from service.core.contact import apply_contact
    from service.core.ledger import UNSUBSCRIBED_BY_US

    rig = Rig()
    enter_a = rig.change(audience="A")
    enter_a.plan = Plan.FIRST_ENTRY
    exit_b = rig.change(audience="B", action=Action.EXITED)
    exit_b.plan = Plan.EXIT
    list_ids = {ListRef("A"): "11", ListRef("B"): "12"}
    replies = iter(
        [
            ok({"contactLists": [{"list": "12", "status": "1"}]}),  # the contact's lists
            refused(422, "related_missing", "/data/attributes/list"),  # A: no such list
            ok({"contactList": {"list": "12", "status": 2}}),  # B: unsubscribed
        ]
    )
    outcomes, sent = drive(
        apply_contact("a@example.com", [enter_a, exit_b], list_ids, "5", None), replies
    )
    assert [(c.method, c.path) for c in sent] == [
        ("GET", "contacts/5/contactLists"),
        ("POST", "contactLists"),
        ("POST", "contactLists"),
    ]
    a, b = outcomes
    assert (a.kind, a.list_gone) == (OutcomeKind.RETRY, "11")
    assert (b.kind, b.known) == (OutcomeKind.APPLIED, UNSUBSCRIBED_BY_US)
    rig.confirm.settle(outcomes, rig.ownership.generation(0), rig.now)
    rig.producer.ack_all()
    assert rig.letters() == []  # nothing parked
    entry = rig.ledger.get(0, "a@example.com")
    assert entry is not None and entry.state("B") is not None and entry.state("A") is None
    assert rig.tracker.committable()[0] == 0  # A's offset waits for its retry; B's is done
    assert rig.tracker.outstanding(0) == 2  # B is done, behind A
    _, retried = retried_at(rig, "a@example.com")
    assert retried is enter_a


# ---- §8 a deleted list -------------------------------------------------------------------------


def add(rig: Rig, email: str, audience: str, action: Action = Action.ENTERED) -> int:
    """A consumed record of partition 0, tracked and coalesced (as ``Source`` does)."""
    offset = next(rig._offsets)
    assert rig.tracker.track(0, offset)
    rig.coalescer.add(0, ListRef(audience), event(email, audience, action), b"raw", offset, rig.now)
    return offset


class FakeAc:
    """AC as the per-contact and list calls see it: lists by name (created on demand), one
    contact (id 5) that is on no list; every request recorded."""

    def __init__(self, lists: dict[str, str]) -> None:
        self.lists = lists  # name -> id
        self.sent: list[ApiCall] = []

    def __call__(self, request: ApiCall) -> Reply:
        self.sent.append(request)
        path, body = request.path, dict(request.body or {})
        if path == "lists" and request.method == "GET":
            name = dict(request.params).get("filters[name]")
            found = [{"id": i, "name": n} for n, i in self.lists.items() if n == name]
            return ok({"lists": found})
        if path == "lists":
            name = body["list"]["name"]
            self.lists[name] = str(20 + len(self.lists))
            return Reply(
                201, "application/json", json.dumps({"list": {"id": self.lists[name]}}).encode()
            )
        if path == "contact/sync":
            return ok({"contact": {"id": "5"}})
        if path.endswith("/contactLists"):
            return ok({"contactLists": []})
        if path == "contactLists":
            return ok({"contactList": body["contactList"]})
        raise AssertionError(f"unexpected request {request}")

    def statuses(self) -> list[tuple[str, str]]:
        """(list id, status) of every contactLists write."""
        return [
            (c.body["contactList"]["list"], c.body["contactList"]["status"])  # type: ignore[index]
            for c in self.sent
            if c.path == "contactLists"
        ]


def finish(rig: Rig, kind: str, ac: FakeAc) -> Any:
    """Run the one task of ``kind`` in flight against ``ac``; hand its result to the delivery
    stage (as the loop does) and return it."""
    [(handle, task)] = [
        (h, t) for h, t in rig.dispatcher.inflight.items() if type(t).__name__ == kind
    ]
    del rig.dispatcher.inflight[handle]
    try:
        result = run_sync(handle.call, ac)
    except PermanentApiError as error:
        result = error
    rig.delivery.completed(task, result, rig.now)
    return result


def test_issue14_8_a_list_deleted_in_ac_is_found_or_created_again() -> None:
    """Issue 14 §8: list ids were cached for ever, so every change of a list deleted in AC
    failed on the dead id. Now AC's ``related_missing`` on the list drops the id from the
    directory; the change's retry waits for the list to be resolved again (created, with
    ``AC_CREATE_LISTS``) and is then sent to the new list."""
    from service.pipeline.dispatch import ApplyTask

    rig = Rig()
    ref = ListRef("A")
    rig.desk.directory.learn(ref, "11", rig.now)
    change = rig.change(audience="A")
    change.plan = Plan.FIRST_ENTRY
    task = ApplyTask("a@example.com", 0, rig.ownership.generation(0), [change], 0)
    gone = PermanentApiError(422, "related_missing", "no list", {}, pointer="/data/attributes/list")
    outcome = Outcome(change, OutcomeKind.RETRY, error=gone, list_gone="11")
    rig.delivery.applied(task, [outcome], rig.now)
    assert rig.desk.directory.get(ref) is None  # the dead id is forgotten
    rig.now = (rig.coalescer.next_due_at() or 0.0) + 0.01
    rig.delivery.step(rig.now)  # the retry is due: it waits for its list
    rig.delivery.step(rig.now)  # the lookup starts
    ac = FakeAc({})  # list A is gone from AC
    assert finish(rig, "ListTask", ac) == "20"  # created again
    assert rig.desk.directory.get(ref) == "20"
    rig.delivery.step(rig.now)  # decided again: written ahead, then sent
    rig.producer.ack_all()
    finish(rig, "ApplyTask", ac)
    assert ac.statuses() == [("20", "1")]
    rig.producer.ack_all()
    entry = rig.ledger.get(0, "a@example.com")
    assert entry is not None and entry.state("A", "20") is not None
    assert rig.committable() == 1


def test_issue14_8_without_list_creation_only_the_missing_lists_changes_are_parked() -> None:
    """Issue 14 §8: with ``AC_CREATE_LISTS=false`` a list that does not exist parks its
    changes (``list_missing``); the email's changes of other lists are not parked with them:
    they go back and are applied."""
    rig = Rig(create_lists=False)
    rig.desk.directory.learn(ListRef("B"), "12", rig.now)
    missing = add(rig, "a@example.com", "A")
    other = add(rig, "a@example.com", "B")
    rig.now += 1.5
    rig.delivery.step(rig.now)  # the group waits for list A
    rig.delivery.step(rig.now)  # its lookup starts
    ac = FakeAc({"B": "12"})
    result = finish(rig, "ListTask", ac)
    assert isinstance(result, PermanentApiError) and result.code == "list_missing"
    [letter] = rig.letters()
    assert (letter["dlq.reason"], letter["dlq.source.offset"]) == ("list_missing", str(missing))
    rig.producer.ack_all()
    assert rig.committable() == other  # A's record parked; B's change still to apply
    rig.delivery.step(rig.now)  # B's change, decided alone: written ahead, then sent
    rig.producer.ack_all()
    finish(rig, "ApplyTask", ac)
    assert ac.statuses() == [("12", "1")]
    rig.producer.ack_all()
    assert rig.committable() == other + 1
    assert len(rig.letters()) == 1


# ---- §9 the account gate, and results of an older generation ----------------------------------


def test_issue14_9_the_gate_opens_only_on_an_answer_to_a_real_request() -> None:
    """Issue 14 §9: recording a change cleared the "account refused" state even when the
    change was settled without any request (nothing had shown that AC accepts the token
    again). Now the gate stays closed through changes settled from the ledger alone and
    through per-contact work that sent nothing; it opens on the answer to a request."""
    from service.pipeline.dispatch import ApplyTask

    rig = Rig()
    gate = rig.confirm.gate
    gate.close(rig.now, "AuthRejected")
    add(rig, "a@example.com", "VIP", Action.EXITED)  # an exit of a contact never ours: no request
    rig.desk.directory.learn(ListRef("VIP"), "11", rig.now)
    rig.now += 1.5
    rig.delivery.step(rig.now)  # gate closed: taken and decided (settled: nothing to send)
    rig.producer.ack_all()
    assert rig.committable() == 1  # settled and recorded without a request
    assert gate.closed
    settled = rig.change("b@example.com")
    settled.plan = Plan.SKIP
    task = ApplyTask("b@example.com", 0, rig.ownership.generation(0), [settled], 0)
    rig.delivery.applied(task, [Outcome(settled, OutcomeKind.APPLIED)], rig.now)
    assert gate.closed  # applied, but no request was sent
    task.requests = 1
    task.blocked_reply = True
    rig.delivery.applied(task, [Outcome(settled, OutcomeKind.APPLIED)], rig.now)
    assert gate.closed  # a request was sent, and AC refused it
    rig.now = gate.probe_at
    rig.delivery.step(rig.now)  # one probe while the gate is closed
    probe = finish(rig, "ProbeTask", FakeAc({}))
    assert isinstance(probe, dict) and not gate.closed  # AC answered the probe


def test_issue14_9_a_park_of_an_older_generation_completes_nothing() -> None:
    """Issue 14 §9: a result came back after its partition was revoked and assigned again,
    and parking it checked only that the partition was assigned, not in which generation: it
    completed an offset the new assignment had tracked afresh (and parked a record the new
    owner processes). Now a failure of an older generation is ignored, and a dead letter's
    ack for one completes nothing."""
    rig = Rig()
    old = rig.ownership.generation(0)
    change = rig.change()
    refusal = PermanentApiError(422, "field_invalid", "bad", {})
    rig.confirm.failed(Outcome(change, OutcomeKind.PERMANENT, error=refusal), old, rig.now)
    assert len(rig.producer.to(DLQ)) == 1  # parked under the old generation, not acked yet
    rig.ownership.revoke([0])  # revoked, and assigned again: records read afresh
    rig.tracker.drop([0])
    rig.ownership.assign([0])
    rig.ownership.restored(0)
    assert rig.tracker.track(0, 0)
    rig.producer.ack_all()  # the old letter's ack
    assert rig.committable() == 0  # offset 0 of the new assignment is not done
    rig.confirm.failed(Outcome(change, OutcomeKind.PERMANENT, error=refusal), old, rig.now)
    assert len(rig.producer.to(DLQ)) == 1  # an old generation's failure parks nothing
    assert rig.committable() == 0


# ---- found while writing these: failing on core-14 ---------------------------------------------


@pytest.mark.parametrize(
    "odd",
    [{"status": 40}, {"status": 4}, {"status": -1}, {"pending": 300}],
    ids=["status-40", "status-4", "status-negative", "pending-300"],
)
def test_issue14_1_a_ledger_record_the_index_cannot_hold_is_refused_at_decode(
    odd: dict[str, int],
) -> None:
    """Issue 14 §1: anything a ledger record cannot represent in the index must be refused
    at decode (as an unreadable record: ignored, with a warning), never reach
    ``CompactIndex``. ``status`` and ``pending`` are Avro ints, but the packed index keeps
    ``status * 8 + verified * 4 + set_by`` in one byte (with a flag at 32) and ``pending`` in
    another: a record with a status of 40 or -1, or a pending of 300, makes ``pack`` raise
    inside the restore (every replica that is assigned the partition crashes on it, for
    ever), and a status of 4 packs into the pending flag and makes every later read of the
    email raise. The other emails of the partition are restored."""
    bad = LedgerEntry("1", 0, (state(**odd),))
    good = LedgerEntry("2", 0, (state(),))
    records = [
        (0, b"odd@example.com", ledger_value(bad)),
        (0, b"ok@example.com", ledger_value(good)),
    ]
    store = LedgerStore(
        LEDGER,
        AckedProducer(FakeProducer(), sleep=lambda seconds: None),
        readers_of(records),
        clock=lambda: 0.0,
    )
    store.start_restore([0])
    assert store.restore_step(1.0) is not None
    assert store.get(0, "ok@example.com") == good
    assert store.get(0, "odd@example.com") is None


def test_issue14_4_an_import_still_processing_past_the_timeout_keeps_its_emails() -> None:
    """Issue 14 §4: "after the import timeout ... emails were released while the import could
    still complete". For ten minutes past ``IMPORT_TIMEOUT_SECONDS`` AC answers every
    ``import/info`` with "processing" and counts the import as outstanding in its summary:
    the import has not landed and still will, so its emails stay held whatever the lifecycle
    asks (the module's diagram: processing past the timeout -> UNKNOWN). They are released
    once AC says the import completed."""
    from service.core.acapi import import_info

    rig = Rig()
    lifecycle = rig.lifecycle
    import_id, _changes, _entries = import_of(rig, ["a@example.com"])
    lifecycle.submitted(import_id, Submitted("batch-1", [0], [], None, 1), rig.now, rig.wall)
    started = lifecycle.imports[import_id].started

    def ask_ac(now: float, *, landed: bool) -> set[str]:
        """Answer whatever the lifecycle asks at ``now``; the emails it releases."""
        actions: list[Any] = []
        for imp in lifecycle.polls_due(now):
            lifecycle.polling(imp, now)
            answer = (
                {"status": "completed", "success": ["5"], "failure": []}
                if landed
                else {"status": "processing"}
            )
            status, _ = drive(import_info("batch-1"), iter([ok(answer)]))
            actions += lifecycle.polled(imp.import_id, status, now)
        if lifecycle.summary_due(now):
            lifecycle.asking_summary(now)
            actions += lifecycle.summarized(0 if landed else 1, now)
        return released(actions)

    for step in range(120):  # from the timeout on, ten more minutes of "processing"
        assert ask_ac(started + 601.0 + 5.0 * step, landed=False) == set()
        assert lifecycle.busy_emails() == {"a@example.com"}
    freed = set()
    for step in range(60):
        freed |= ask_ac(started + 1201.0 + 5.0 * step, landed=True)
    assert freed == {"a@example.com"} and lifecycle.busy_emails() == set()

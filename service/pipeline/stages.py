"""The stages of one replica, built on its ports and wired to each other (``build_stages``).

``Ports`` is everything the loop talks to; ``Stages`` is what ``Loop`` sequences. The wiring
is where the stages' shared state is made one: every stage that asks who owns a partition
holds the same ``Ownership``, every stage that tracks or completes offsets the same
``OffsetTracker``, and the coalescer, the ledger store and the dispatcher are one each, so a
hand-over seen by one stage is seen by all. The ledger and the dead-letter topic share the
one acked producer (their acks complete offsets), and the import budget is the one the
rebalancer reshares as partitions come and go.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.adapters.dlq import DeadLetterQueue
from service.adapters.executor import Executor
from service.adapters.kafka import AckedProducer, Consumer, LogReaderFactory, RecordReaderFactory
from service.adapters.ledger_store import LedgerStore
from service.app.settings import Settings
from service.clock import Clock
from service.core.breaker import PoisonBreaker
from service.core.budget import ImportBudget
from service.core.coalesce import Coalescer
from service.core.codec import EventDecoder
from service.core.lists import ListDirectory, ListNamer
from service.core.offsets import OffsetTracker
from service.metrics import Metrics
from service.pipeline import flow
from service.pipeline.ahead import ReadAhead
from service.pipeline.backpressure import BackPressure
from service.pipeline.commit import CommitSchedule, Committer
from service.pipeline.confirm import Confirmer
from service.pipeline.deliver import Delivery
from service.pipeline.desk import DeliverySettings, Desk
from service.pipeline.dispatch import Dispatcher
from service.pipeline.health import Health
from service.pipeline.imports import ImportLifecycle
from service.pipeline.ownership import Ownership
from service.pipeline.rebalance import Rebalancer
from service.pipeline.source import Source


@dataclass
class Ports:
    """Everything the loop talks to. Real clients in production (``app/wiring.py``), the
    simulated cluster, account and clock in the simulation."""

    consumer: Consumer
    producer: AckedProducer
    readers: LogReaderFactory
    executor: Executor
    requests: Any  # the request budget: share, rate, waiting, paused_for, close
    decoder: EventDecoder
    clock: Clock
    rng: random.Random
    housekeeping: Callable[[float], None] = lambda now: None
    # The read-ahead's reader of backlogs (``pipeline/ahead.py``); None: no read-ahead.
    scanners: RecordReaderFactory | None = None
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex


@dataclass
class Stages:
    """One replica's stages, sharing one ownership, tracker, coalescer, ledger and dispatcher."""

    ownership: Ownership
    tracker: OffsetTracker
    coalescer: Coalescer
    pauses: flow.Pauses
    ledger: LedgerStore
    confirm: Confirmer
    dispatcher: Dispatcher
    delivery: Delivery
    source: Source
    committer: Committer
    schedule: CommitSchedule
    rebalance: Rebalancer
    backpressure: BackPressure
    health: Health


def build_stages(
    settings: Settings,
    ports: Ports,
    metrics: Metrics,
    hasher: Callable[[str], str],
    turn: Callable[[float], None],
) -> Stages:
    """The stages, wired. ``turn`` is the loop's turn of work without consuming (a revoke
    runs it while it waits for the partition's work in flight)."""
    s, clock = settings, ports.clock
    topic, consumer = s.kafka_topic, ports.consumer
    ownership = Ownership()
    tracker = OffsetTracker()
    stale_tolerance_ms = (
        None
        if s.stale_event_tolerance_seconds is None
        else round(s.stale_event_tolerance_seconds * 1000)
    )
    coalescer = Coalescer(s.coalesce_window_seconds, stale_tolerance_ms)
    pauses = flow.Pauses(topic, consumer)
    ledger = LedgerStore(
        s.kafka_ledger_topic,
        ports.producer,
        ports.readers,
        clock=clock.monotonic,
        on_failure=metrics.ledger_write_failures.inc,
    )
    confirm = Confirmer(
        topic,
        coalescer,
        tracker,
        ledger,
        DeadLetterQueue(ports.producer, s.kafka_dlq_topic, clock.wall),
        ownership,
        metrics,
        hasher,
        clock.wall,
        ports.rng,
        retry_cap=s.retry_max_backoff_seconds,
        give_up_after=s.retry_give_up_seconds,
    )
    # A charge in flight is dated ahead by more than a request can take.
    budget = ImportBudget(
        s.ac_imports_per_minute, in_flight=max(60.0, 2 * s.ac_request_timeout_seconds)
    )
    dispatcher = Dispatcher(ports.executor, s.ac_concurrency)
    desk = Desk(
        DeliverySettings(
            s.ac_concurrency,
            s.ac_bulk_import,
            s.bulk_min_contacts,
            s.ac_create_lists,
            s.ac_list_sender_url,
            s.ac_list_sender_reminder,
            s.attribute_map,
            s.field_map,
            stale_tolerance_ms,
        ),
        coalescer,
        ledger,
        ListDirectory(verify_after=s.list_verify_seconds, max_lists=s.max_lists),
        dispatcher,
        confirm,
        ownership,
        metrics,
        clock.wall,
        clock.monotonic,
    )
    lifecycle = ImportLifecycle(
        budget,
        s.import_timeout_seconds,
        ports.rng,
        ports.new_id,
        give_up=s.import_give_up_seconds,
    )
    delivery = Delivery(desk, lifecycle)
    namer = ListNamer(s.list_name_template, s.list_mapping)
    source = Source(
        topic,
        tracker,
        coalescer,
        ports.decoder,
        namer,
        confirm,
        ownership,
        metrics,
        clock.wall,
        pauses.hold,
        pauses.release,
        delivery.want_list,
        expedite=s.coalesce_from_publish_time,
        breaker=PoisonBreaker(s.dlq_breaker_window, s.dlq_breaker_max_share),
    )
    committer = Committer(topic, consumer, tracker, metrics, clock.monotonic, clock.wall)
    schedule = CommitSchedule(s.commit_interval_seconds)
    rebalance = Rebalancer(
        topic,
        s.ac_rate_share == "partitions",
        consumer,
        ownership,
        pauses,
        tracker,
        coalescer,
        source,
        delivery,
        dispatcher,
        ledger,
        ports.producer,
        committer,
        budget,
        ports.requests,
        metrics,
        clock.monotonic,
        clock.sleep,
        s.revoke_deadline_seconds,
        turn,
    )
    if ports.scanners is not None and s.read_ahead_max_keys > 0:
        rebalance.ahead = ReadAhead(
            topic,
            ports.scanners,
            ports.decoder,
            namer,
            stale_tolerance_ms,
            s.read_ahead_max_keys,
            s.read_ahead_max_seconds,
            clock.monotonic,
            delivery.want_list,
        )
    backpressure = BackPressure(
        flow.Bounds(s.max_pending_changes, s.max_tracked_offsets, s.max_pending_bytes),
        ownership,
        pauses,
        tracker,
        coalescer,
        dispatcher,
        delivery,
        metrics,
    )
    health = Health(
        topic,
        consumer,
        ports.requests,
        clock,
        ownership,
        pauses,
        tracker,
        coalescer,
        dispatcher,
        delivery,
        source,
        confirm,
        committer,
        metrics,
        last_heartbeat=clock.monotonic(),
    )
    return Stages(
        ownership,
        tracker,
        coalescer,
        pauses,
        ledger,
        confirm,
        dispatcher,
        delivery,
        source,
        committer,
        schedule,
        rebalance,
        backpressure,
        health,
    )

"""The loop: poll, decode, coalesce, deliver, commit. The only place with mutable pipeline state.

One thread (the caller of ``run``) owns the consumer, the coalescer and the offset tracker;
confluent-kafka calls the rebalance callbacks from inside ``consume()`` on this same thread.
Deliveries run on a small worker pool; their outcomes come back as futures that this thread
drains, so no pipeline state is ever touched by two threads.

Promises:
- an offset is committed only when its change was applied, superseded by an applied later
  change for the same key, or parked in the DLQ with the broker's ack (``OffsetTracker``);
- one email is never in two requests at once (the ``busy`` set);
- the loop never sleeps for long: back-pressure pauses partitions and keeps polling;
- revoke: drop pending work of the partitions, let their in-flight work finish within
  ``REVOKE_DEADLINE_SECONDS``, commit their watermark, forget them. Lost: drop without commit.
- SIGTERM: stop consuming, flush within ``SHUTDOWN_GRACE_SECONDS``, commit, close, exit 0.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaError, KafkaException, TopicPartition

from service.adapters.activecampaign import ImportStatus
from service.adapters.apply import ChangeOutcome, ContactApplier, OutcomeKind, contact_fields
from service.adapters.bulk import (
    MAX_CONTACTS,
    BulkImporter,
    Group,
    Submitted,
    consent_ids,
    next_poll_delay,
)
from service.adapters.dlq import DeadLetter, DeadLetterQueue
from service.adapters.ledger_store import LedgerStore
from service.adapters.lists import ListNamer
from service.adapters.ratelimit import ImportBudget, RateLimiter
from service.app.logs import EmailHasher
from service.app.runtime import Collector
from service.app.settings import Settings
from service.core.backoff import backoff_delay
from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.codec import EventDecoder
from service.core.errors import (
    ApiError,
    AuthRejected,
    PermanentApiError,
    PoisonMessage,
    RateLimited,
)
from service.core.ledger import (
    LedgerEntry,
    ListState,
    Plan,
    fields_hash,
    merged,
    plan_change,
    set_by_after,
)
from service.core.offsets import OffsetTracker
from service.metrics import Metrics

logger = logging.getLogger(__name__)

CONSUME_BATCH = 500
GC_QUIESCE_SECONDS = 0.1  # see RateLimiter.quiesce
IMPORT_GATHER_SECONDS = 0.2  # the bulk path takes due changes once the first is this late
IDLE_COMMIT_SECONDS = 0.5  # at most this often when idle (a commit is a no-op if nothing is new)
AUTH_RETRY_SECONDS = 15.0
IMPORT_RATE_LIMIT_PAUSE = 60.0
# How long completed imports may wait for their list's consent check, so that one read covers
# the first entries of several imports (one page of a fresh list's unsubscribed members answers
# for any number of them). At 100 imports a minute over five lists that is 0.25 reads a second
# instead of 8 (each read is a request slot an import or its confirmation could have used); the
# price is that their contacts stay busy and their offsets open up to 20 s longer. When no other
# import is still processing, the check runs at once (small loads do not wait).
CONSENT_CHECK_SECONDS = 20.0


@dataclass
class _InFlight:
    email: str
    partition: int
    generation: int
    changes: list[PendingChange]
    cancel: threading.Event
    kind: str = "apply"  # "apply" (per contact), "import" (submit), "poll" (import/info),
    # "consent" (who stayed unsubscribed among first entries of completed imports, per list),
    # "lists" (find or create the lists of the next import)
    groups: list[Group] | None = None
    batch_id: str = ""
    generations: dict[int, int] = field(default_factory=dict)
    contact_id: str | None = None
    consent: _ConsentBatch | None = None
    charge: int = 0  # the import's charge on the import budget (settled when it returns)


@dataclass
class _Outstanding:
    """An import AC queued: its contacts stay busy and its offsets open until it completes."""

    batch_id: str
    groups: list[Group]
    generations: dict[int, int]
    queued_at: float
    next_poll_at: float
    polls: int = 0
    polling: bool = False
    poll_started: float = 0.0
    # Once AC reported it completed: the answer, and the consent checks it still waits for.
    status: ImportStatus | None = None
    first_entries: dict[ListRef, set[str]] = field(default_factory=dict)  # list -> emails
    kept: set[tuple[str, ListRef]] = field(default_factory=set)  # (email, list) opted out


@dataclass
class _ConsentBatch:
    """First entries of completed imports that wait for one consent check of one list."""

    target: ListRef
    since: float  # when the oldest of them started waiting
    emails: set[str] = field(default_factory=set)
    ids: list[str] = field(default_factory=list)  # contact ids of those imports
    batch_ids: set[str] = field(default_factory=set)


class Runner:
    def __init__(
        self,
        settings: Settings,
        consumer: Any,
        producer: Any,
        decoder: EventDecoder,
        applier: ContactApplier,
        limiter: RateLimiter,
        metrics: Metrics,
        hasher: EmailHasher,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        bulk: BulkImporter | None = None,
        ledger: LedgerStore | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.kafka_topic
        self.consumer = consumer
        self.decoder = decoder
        self.applier = applier
        self.limiter = limiter
        self.metrics = metrics
        self.hash = hasher
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.coalescer = Coalescer(settings.coalesce_window_seconds)
        self.list_for = ListNamer(settings.list_name_template, settings.list_mapping)
        self.collector = Collector()
        # Per-record counters, resolved once (labels() takes a lock and a dict lookup each time).
        self._consumed = {
            o: metrics.events_consumed.labels(self.topic, o)
            for o in ("valid", "invalid", "duplicate")
        }
        self.tracker = OffsetTracker()
        self.dlq = DeadLetterQueue(producer, settings.kafka_dlq_topic, self._parked)
        self.pool = ThreadPoolExecutor(settings.ac_concurrency, thread_name_prefix="ac")
        self.inflight: dict[Future[Any], _InFlight] = {}
        self.bulk = bulk
        # On the wall clock. A charge in flight is dated ahead by more than a request can take.
        self.import_budget = ImportBudget(
            settings.ac_imports_per_minute,
            in_flight=max(60.0, 2 * settings.ac_request_timeout_seconds),
        )
        self.imports: dict[str, _Outstanding] = {}
        self.consent_due: dict[ListRef, _ConsentBatch] = {}  # waiting for a check
        self.consent_checking: set[ListRef] = set()  # a check is in flight
        self.resolving_lists = 0  # lookups of lists for the next imports in flight
        self.lists_looked_up: set[ListRef] = set()
        self.lists_wanted: set[ListRef] = set()  # seen in events, not looked up yet
        self.expected_import_seconds = 2.0  # learned from completions (EWMA)
        if ledger is None:
            raise ValueError("the runner needs a ledger")
        self.ledger = ledger
        ledger.progress = self._touch  # a long restore must not look like a stuck loop
        ledger.on_failure = metrics.ledger_write_failures.inc
        self.busy: set[str] = set()
        self.restoring: set[int] = set()  # assigned, ledger not loaded yet
        self.share_stale = False  # the assignment changed: take the new share after consume()
        self.total_partitions = 0  # of the source topic, learned outside rebalance callbacks
        self.assigned: set[int] = set()
        self.generation: dict[int, int] = {}
        self.last_committed: dict[int, int] = {}
        # Per partition, since it was last caught up: (last offset, publication time) per batch.
        self.published: dict[int, list[tuple[int, float]]] = {}
        self.paused = False
        self.auth_blocked = False
        self.auth_retry_at = 0.0
        self.broker_ok = False
        self.last_heartbeat = clock()
        self._stop = threading.Event()
        self._next_commit = clock() + settings.commit_interval_seconds
        self._next_idle_commit = clock()
        self._closing = False

    # ---- lifecycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def on_kafka_error(self, error: Any) -> None:
        """librdkafka's ``error_cb``: broker reachability feeds readiness."""
        if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            self.broker_ok = False
        logger.warning("kafka error", extra={"error": error.str()})

    def run(self) -> int:
        self.consumer.subscribe(
            [self.topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        logger.info("consuming", extra={"topic": self.topic, "group": self.settings.kafka_group_id})
        try:
            while not self._stop.is_set():
                self.step()
            self.shutdown()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
        return 0

    def step(self) -> None:
        """One loop iteration. Never blocks for more than a fraction of a second."""
        busy = bool(self.inflight) or len(self.coalescer) > 0
        messages = self.consumer.consume(CONSUME_BATCH, 0.05 if busy else 0.25)
        if self.restoring or self.share_stale:
            self._settle_assignment()
        now = self.clock()
        self._ingest(messages, now)
        self._drain(now)
        self._dispatch(now)
        self.dlq.poll()
        self.ledger.poll()
        self._apply_backpressure()
        if now >= self._next_commit or (now >= self._next_idle_commit and self._idle()):
            # Periodically, and as soon as the work runs out: a drained backlog is committed
            # at once (a restart then repeats nothing), without a commit per change meanwhile.
            self.commit()
            self._update_lag()
            self._next_commit = now + self.settings.commit_interval_seconds
            self._next_idle_commit = now + IDLE_COMMIT_SECONDS
        self._heartbeat(now)
        self._collect_garbage(now)

    def _collect_garbage(self, now: float) -> None:
        """The scheduled full collection (``service/app/runtime.py``), between two iterations."""
        collected = self.collector.maybe_collect(now, self._quiesce_requests)
        if collected is None:
            return
        found, pause = collected
        self.metrics.gc_pause.observe(pause)
        self.metrics.gc_unreachable.inc(found)
        logger.info(
            "garbage collected",
            extra={
                "unreachable": found,
                "pause_seconds": round(pause, 3),
                "pending": len(self.coalescer),
            },
        )

    def _quiesce_requests(self) -> None:
        """No request may be between its slot and the wire while a collection holds every
        thread (see ``RateLimiter.quiesce``)."""
        self.limiter.quiesce(GC_QUIESCE_SECONDS)

    def _idle(self) -> bool:
        """Nothing pending, in flight or queued at AC: what completed can be committed now."""
        return not self.inflight and not self.imports and len(self.coalescer) == 0

    def shutdown(self) -> None:
        """Stop consuming, flush within the grace period, commit, close."""
        grace = self.settings.shutdown_grace_seconds
        deadline = self.clock() + grace
        logger.info("shutting down", extra={"grace_seconds": grace, "pending": len(self.coalescer)})
        if self.assigned:
            self.consumer.pause([TopicPartition(self.topic, p) for p in self.assigned])
        while self.clock() < deadline and (len(self.coalescer) or self.inflight or self.imports):
            self.consumer.consume(CONSUME_BATCH, 0.05)  # keeps the group session alive; paused
            now = self.clock()
            self._drain(now)
            self._dispatch(now, flush_all=True)
            self.dlq.poll()
            self.ledger.poll()
            self._heartbeat(now)
        self._flush_writes(max(0.5, deadline - self.clock()))
        self.limiter.close()
        self._drain(self.clock())
        self.commit()
        self._closing = True
        left = len(self.coalescer) + sum(len(f.changes) for f in self.inflight.values())
        self.consumer.close()
        logger.info("stopped", extra={"changes_left_uncommitted": left})

    # ---- ingest --------------------------------------------------------------------------

    def _ingest(self, messages: list[Any], now: float) -> None:
        """Track, decode (the whole batch at once) and coalesce consumed records; bad ones go
        to the DLQ."""
        accepted: list[Any] = []
        caught_up: list[int] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    caught_up.append(message.partition())
                else:
                    logger.warning("consumer error", extra={"error": error.str()})
                    if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
                        self.broker_ok = False
                continue
            self.broker_ok = True
            partition = message.partition()
            if partition not in self.assigned or not self.tracker.track(
                partition, message.offset()
            ):
                self._consumed["duplicate"].inc()
                continue
            accepted.append(message)
        if accepted:
            self._coalesce(accepted, now)
        for partition in caught_up:
            self._caught_up(partition, now)

    def _coalesce(self, accepted: list[Any], now: float) -> None:
        decoded = self.decoder.decode_batch([m.value() for m in accepted])
        valid = coalesced = 0
        last: dict[int, Any] = {}
        for message, event in zip(accepted, decoded, strict=True):
            last[message.partition()] = message
            if isinstance(event, PoisonMessage):
                self._dead_letter(message, event)
                continue
            try:
                target = self.list_for(event)
            except PoisonMessage as poison:
                self._dead_letter(message, poison)
                continue
            valid += 1
            if target not in self.lists_looked_up:
                self.lists_wanted.add(target)
            coalesced += self.coalescer.add(
                message.partition(), target, event, message.value(), message.offset(), now
            )
        self._consumed["valid"].inc(valid)
        self.metrics.events_coalesced.inc(coalesced)
        # When the batch's records were published, per partition: its last record's timestamp
        # bounds every earlier one's (for ``_caught_up``).
        for partition, message in last.items() if self.settings.coalesce_from_publish_time else ():
            kind, stamp = message.timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE and stamp > 0:
                self.published.setdefault(partition, []).append((message.offset(), stamp / 1000))

    def _caught_up(self, partition: int, now: float) -> None:
        """The partition's end was reached: changes of records published more than a window ago
        are due now (see ``Coalescer.expedite``)."""
        stamps = self.published.pop(partition, [])
        if not stamps or partition not in self.assigned:
            return
        if not self.settings.coalesce_from_publish_time:
            return
        offsets = [offset for offset, _ in stamps]

        def published(offset: int) -> float | None:
            at = bisect.bisect_left(offsets, offset)
            return stamps[at][1] if at < len(stamps) else None

        moved = self.coalescer.expedite(partition, now, self.wall(), published)
        if moved:
            logger.debug("caught up", extra={"partition": partition, "sooner": moved})

    def _dead_letter(self, message: Any, poison: PoisonMessage) -> None:
        partition, offset = message.partition(), message.offset()
        self._consumed["invalid"].inc()
        logger.info(
            "record to dead-letter topic",
            extra={"reason": poison.reason, "partition": partition, "offset": offset},
        )
        self.dlq.send(
            DeadLetter(
                message.key(),
                message.value(),
                poison.reason,
                type(poison).__name__,
                poison.detail,
                self.topic,
                partition,
                offset,
            )
        )

    def _parked(self, letter: DeadLetter) -> None:
        """Broker acknowledged a dead letter: its offsets are done."""
        if letter.source_partition not in self.assigned:
            return
        self.metrics.dlq_records.labels(letter.reason).inc()
        for offset in letter.covered_offsets or (letter.source_offset,):
            self.tracker.complete(letter.source_partition, offset)

    # ---- delivery ------------------------------------------------------------------------

    def _dispatch(self, now: float, *, flush_all: bool = False) -> None:
        free = self.settings.ac_concurrency - len(self.inflight)
        if free <= 0:
            return
        if self.auth_blocked:
            if now < self.auth_retry_at or self.inflight:
                return
            free = 1  # one probe at a time while the token is refused
            self.auth_retry_at = now + AUTH_RETRY_SECONDS
        # Polls (confirmations, with their consent checks) never hold every worker: one is
        # always left for new imports and per-contact changes, or a backlog would stall.
        polling = sum(1 for item in self.inflight.values() if item.kind in ("poll", "consent"))
        poll_room = max(0, min(free, self.settings.ac_concurrency - 1 - polling))
        used = self._dispatch_polls(now, poll_room)
        used += self._dispatch_consent(now, poll_room - used, flush=flush_all)
        if (
            self.lists_wanted
            and self.bulk is not None
            and not (self.resolving_lists or self.auth_blocked)
        ):
            # Look up (or create) the lists of new audiences while their first changes wait for
            # the coalescing window, so the first import need not wait for them.
            wanted = {t for t in self.lists_wanted if not self.bulk.lists.known(t)}
            self.lists_wanted.clear()
            if wanted:
                used += self._resolve_lists(wanted, free - used)
        free -= used
        if free <= 0:
            return
        bulk = self.bulk is not None and not self.auth_blocked
        if bulk and not flush_all:
            head = self.coalescer.next_due_at()
            if head is None or now < head + IMPORT_GATHER_SECONDS:
                # Changes fall due a few milliseconds apart (records of different partitions
                # or batches): wait a moment, so they leave in one import, not in two or by
                # the per-contact path.
                self._gauges()
                return
        limit = MAX_CONTACTS if bulk else free
        taken = self.coalescer.take_due(now, limit=limit, busy=self.busy, flush_all=flush_all)
        groups = [g for g in (self._plan(g, now) for g in taken) if g]
        single = [g for g in groups if self._needs_single(g)]
        multi = [g for g in groups if not self._needs_single(g)]
        while (
            bulk
            and len(taken) == limit
            and 0 < len(multi) < MAX_CONTACTS
            and self.import_budget.available(self.wall())
        ):
            # Fill the import: the ledger settles some groups without a request (and some go
            # per contact), and an import is too scarce to send a quarter empty.
            limit = MAX_CONTACTS - len(multi)
            taken = self.coalescer.take_due(now, limit=limit, busy=self.busy, flush_all=flush_all)
            for group in (self._plan(g, now) for g in taken):
                if group:
                    (single if self._needs_single(group) else multi).append(group)
        if bulk and len(multi) >= self.settings.bulk_min_contacts:
            unresolved = self._unresolved_lists(multi)
            if unresolved or self.resolving_lists:
                # Find or create the lists first, then import: an import that waited for list
                # lookups after taking its tick would reach AC late, bunched with the next ones,
                # and a minute later AC's 100-a-minute window would hold too many.
                if not self.resolving_lists:
                    free -= self._resolve_lists(unresolved, free)
                self._restore(multi)
            elif self.import_budget.available(self.wall()):
                self._submit_import(multi, now)
                free -= 1
            else:
                # No import slot yet: keep them pending, so the batch grows while we wait.
                self._restore(multi)
        else:
            single += multi
        for group in single[:free]:
            email, partition = group[0].email, group[0].partition
            cancel = threading.Event()
            entry = self.ledger.get(partition, email)
            known_id = entry.contact_id if entry else None
            send_fields = self._fields_changed(group, entry)
            future = self.pool.submit(
                self.applier.apply, email, group, cancel, known_id, send_fields
            )
            self.inflight[future] = _InFlight(
                email, partition, self.generation.get(partition, 0), group, cancel
            )
            self.busy.add(email)
        self._restore(single[free:])
        self._gauges()

    def _release(self, email: str) -> None:
        """The email's request or import is over: it may be handed out again."""
        self.busy.discard(email)
        self.coalescer.release(email)

    def _unresolved_lists(self, groups: list[list[PendingChange]]) -> set[ListRef]:
        """Lists of these changes whose AC id is not known yet (and not looked up already: a
        lookup that failed is left to the import, which reports the error per contact)."""
        assert self.bulk is not None
        lists = self.bulk.lists
        return {
            c.target
            for g in groups
            for c in g
            if c.target not in self.lists_looked_up and not lists.known(c.target)
        }

    def _resolve_lists(self, targets: set[ListRef], free: int) -> int:
        """Find or create ``targets`` on up to ``free`` workers at once (a lookup and a create
        each: one after another they would take a request tick and a round trip per list).
        Returns the workers used."""
        assert self.bulk is not None
        lists = self.bulk.lists
        ordered = sorted(targets, key=lambda t: (t.name or "", t.list_id or ""))
        chunks = [ordered[i :: max(1, free)] for i in range(min(len(ordered), max(1, free)))]

        def resolve(chunk: list[ListRef]) -> None:
            for target in chunk:
                with contextlib.suppress(ApiError):
                    lists.list_id(target)

        self.lists_looked_up |= targets  # once: a failed lookup is retried inside the import
        for chunk in chunks:
            future = self.pool.submit(resolve, chunk)
            self.inflight[future] = _InFlight("", -1, 0, [], threading.Event(), kind="lists")
            self.resolving_lists += 1
        return len(chunks)

    @staticmethod
    def _needs_single(changes: list[PendingChange]) -> bool:
        """Per-contact calls for changes an import cannot express: a re-entry to a list this
        service unsubscribed (imports never re-subscribe), or one AC refused in an import."""
        return any(c.force_single or c.plan is Plan.RESUBSCRIBE for c in changes)

    def _fields_changed(self, changes: list[PendingChange], entry: LedgerEntry | None) -> bool:
        standard, custom = contact_fields(
            changes, self.settings.attribute_map, self.settings.field_map
        )
        value = fields_hash(standard, custom)
        return value != 0 and (entry is None or entry.fields_hash != value)

    def _plan(self, group: list[PendingChange], now: float) -> list[PendingChange]:
        """Decide each change from the ledger; settle here what needs no request (a state the
        ledger already holds, a kept opt-out). Returns what must go to AC."""
        email, partition = group[0].email, group[0].partition
        entry = self.ledger.get(partition, email)
        for change in group:
            change.previous = entry.state(change.target.label()) if entry else None
            change.plan = plan_change(
                change.previous,
                change.event.action,
                change.partition,
                change.offsets[-1],
                change.event.occurred_at_ms,
            )
        if all(c.plan in (Plan.SKIP, Plan.CONSENT_KEPT) for c in group) and not (
            self._fields_changed(group, entry)
        ):
            applied_at = self.clock()
            self._record(
                [
                    ChangeOutcome(
                        c,
                        OutcomeKind.APPLIED,
                        applied_at=applied_at,
                        consent_kept=c.plan is Plan.CONSENT_KEPT,
                    )
                    for c in group
                ],
                now,
            )
            return []
        return group

    def _restore(self, groups: list[list[PendingChange]]) -> None:
        for group in groups:
            for change in group:
                self.coalescer.requeue(change, change.due_at)

    def _submit_import(self, groups: list[list[PendingChange]], now: float) -> None:
        assert self.bulk is not None
        charge, charged = self.import_budget.take(self.wall())
        self._write_budget(charged)
        batch = [Group(g[0].email, g) for g in groups]
        changes = [c for g in groups for c in g]
        future = self.pool.submit(self.bulk.submit, batch)
        generations = {c.partition: self.generation.get(c.partition, 0) for c in changes}
        self.inflight[future] = _InFlight(
            "",
            -1,
            0,
            changes,
            threading.Event(),
            kind="import",
            groups=batch,
            generations=generations,
            charge=charge,
        )
        for group in batch:
            self.busy.add(group.email)
        self.metrics.imports.labels("submitted").inc()

    def _write_budget(self, partitions: list[int]) -> None:
        """Write the import-budget history of ``partitions`` to their ledger, for whoever owns
        them next (a budget not shared by partitions has no one to hand it to)."""
        if self.import_budget.owned is None:
            return
        wall = self.wall()
        for partition in partitions:
            if partition in self.assigned:
                self.ledger.write_budget(partition, self.import_budget.history(partition, wall))

    def _dispatch_polls(self, now: float, free: int) -> int:
        """Ask AC about queued imports whose poll is due. Returns the workers used."""
        used = 0
        for outstanding in self.imports.values():
            if used >= free:
                break
            if outstanding.polling or outstanding.status or now < outstanding.next_poll_at:
                continue
            assert self.bulk is not None
            outstanding.polling = True
            outstanding.poll_started = now
            future = self.pool.submit(self.bulk.confirm, outstanding.batch_id)
            self.inflight[future] = _InFlight(
                "", -1, 0, [], threading.Event(), kind="poll", batch_id=outstanding.batch_id
            )
            used += 1
        return used

    def _dispatch_consent(self, now: float, free: int, *, flush: bool = False) -> int:
        """Start the consent checks that are due: a list's first entries waited
        ``CONSENT_CHECK_SECONDS``, or no import is left that could still join them."""
        assert self.bulk is not None or not self.consent_due
        if free <= 0 or not self.consent_due:
            return 0
        still_processing = any(o.status is None for o in self.imports.values())
        used = 0
        for target in list(self.consent_due):
            if used >= free:
                break
            batch = self.consent_due[target]
            if target in self.consent_checking or now < batch.since:
                continue
            waited = now - batch.since >= CONSENT_CHECK_SECONDS
            if not (waited or flush or not still_processing):
                continue
            assert self.bulk is not None
            del self.consent_due[target]
            self.consent_checking.add(target)
            future = self.pool.submit(self.bulk.opted_out, target, batch.emails, batch.ids)
            self.inflight[future] = _InFlight(
                "", -1, 0, [], threading.Event(), kind="consent", consent=batch
            )
            used += 1
        return used

    def _drain(self, now: float) -> None:
        done = [f for f in self.inflight if f.done()]
        for future in done:
            item = self.inflight.pop(future)
            if item.kind == "import":
                self._import_submitted(item, future, now)
                continue
            if item.kind == "poll":
                self._import_polled(item, future, now)
                continue
            if item.kind == "consent":
                self._consent_checked(item, future, now)
                continue
            if item.kind == "lists":
                self.resolving_lists -= 1
                if future.exception() is not None:
                    logger.error("list lookup crashed", exc_info=future.exception())
                continue
            self._release(item.email)
            try:
                outcomes = future.result()
            except Exception:
                logger.exception(
                    "delivery crashed; retrying", extra={"email_hash": self.hash(item.email)}
                )
                outcomes = [ChangeOutcome(c, OutcomeKind.RETRY) for c in item.changes]
            if (
                item.partition not in self.assigned
                or self.generation.get(item.partition) != item.generation
            ):
                continue  # the partition moved on: its offsets were dropped or re-tracked
            self._record([o for o in outcomes if o.kind is OutcomeKind.APPLIED], now)
            for outcome in outcomes:
                if outcome.kind is not OutcomeKind.APPLIED:
                    self._settle(outcome, now)
        if done:
            self._gauges()

    # ---- the bulk path ---------------------------------------------------------------------

    def _owned(self, change: PendingChange, generations: dict[int, int]) -> bool:
        p = change.partition
        return p in self.assigned and self.generation.get(p) == generations.get(p)

    def _import_submitted(self, item: _InFlight, future: Future[Any], now: float) -> None:
        groups = item.groups or []
        try:
            result: Submitted = future.result()
        except Exception:
            logger.exception("import submission crashed; retrying its changes")
            result = Submitted(sent=groups, error=ApiError(None, "crash"))
        # AC counted the import by the time its request returned: date the charge so.
        wall = self.wall()
        changed = set(self.import_budget.settle(item.charge, wall))
        for _ in range(result.requests - 1):  # resent after AC refused some contacts
            extra, charged = self.import_budget.take(wall)
            changed.update(self.import_budget.settle(extra, wall) + charged)
        self._write_budget(sorted(changed))
        for group in groups:
            self._release(group.email)
        for group in result.rejected:
            for change in group.changes:
                if self._owned(change, item.generations):
                    change.force_single = True
                    self.coalescer.requeue(change, now)
        for group in result.unsent:  # did not fit under AC's size limit: the next import
            for change in group.changes:
                if self._owned(change, item.generations):
                    self.coalescer.requeue(change, now)
        for group, error in result.failed:
            for change in group.changes:
                if self._owned(change, item.generations):
                    self._settle(ChangeOutcome(change, OutcomeKind.PERMANENT, error), now)
        if result.error is not None:
            error = result.error
            if isinstance(error, RateLimited) and error.status == 400:
                # AC's per-minute import limit: back-pressure for imports only, not a bad record.
                self.import_budget.pause(self.wall() + IMPORT_RATE_LIMIT_PAUSE)
                self.metrics.imports.labels("rate_limited").inc()
                for group in result.sent:
                    for change in group.changes:
                        if self._owned(change, item.generations):
                            self.coalescer.requeue(change, now)
                return
            self.metrics.imports.labels("failed").inc()
            from service.adapters.apply import outcome_for_error

            for group in result.sent:
                for change in group.changes:
                    if self._owned(change, item.generations):
                        self._settle(outcome_for_error(change, error), now)
            return
        if result.batch_id is None:
            return
        self.imports[result.batch_id] = _Outstanding(
            result.batch_id,
            result.sent,
            item.generations,
            now,
            now + next_poll_delay(0, self.expected_import_seconds),
        )
        for group in result.sent:
            self.busy.add(group.email)  # until AC confirms the import
        self.metrics.imports.labels("queued").inc()
        self.metrics.import_contacts.inc(len(result.sent))

    def _import_polled(self, item: _InFlight, future: Future[Any], now: float) -> None:
        outstanding = self.imports.get(item.batch_id)
        if outstanding is None:
            return
        outstanding.polling = False
        try:
            status: ImportStatus = future.result()
        except RateLimited as error:
            outstanding.next_poll_at = now + error.retry_after
            return
        except AuthRejected:
            outstanding.next_poll_at = now + AUTH_RETRY_SECONDS
            return
        except Exception:
            outstanding.next_poll_at = now + backoff_delay(
                min(outstanding.polls, 6), self.rng.random()
            )
            return
        if not status.completed:
            outstanding.polls += 1
            if now - outstanding.queued_at > self.settings.import_timeout_seconds:
                logger.warning(
                    "import not completed in time; its changes are sent again",
                    extra={"batch_id": outstanding.batch_id},
                )
                del self.imports[outstanding.batch_id]
                self.metrics.imports.labels("timed_out").inc()
                for group in outstanding.groups:
                    self._release(group.email)
                    for change in group.changes:
                        if self._owned(change, outstanding.generations):
                            self.coalescer.requeue(change, now)
            else:
                outstanding.next_poll_at = now + next_poll_delay(
                    outstanding.polls, self.expected_import_seconds
                )
            return
        # Up to the poll that saw it completed: not the consent check after it, nor the wait
        # for its answer to be drained (they would inflate the estimate and delay later polls).
        elapsed = outstanding.poll_started - outstanding.queued_at
        self.expected_import_seconds = 0.7 * self.expected_import_seconds + 0.3 * elapsed
        self.metrics.imports.labels("completed").inc()
        outstanding.status = status
        failed = {e.strip().lower() for e in status.failed_emails}
        for group in outstanding.groups:
            if group.email in failed:
                continue
            for change in group.changes:
                if change.plan is Plan.FIRST_ENTRY and self._owned(change, outstanding.generations):
                    outstanding.first_entries.setdefault(change.target, set()).add(group.email)
        if not outstanding.first_entries or not status.success_ids:
            self._finish_import(outstanding, now)
            return
        # AC may have left some of them unsubscribed (their own opt-out): ask per list, batched
        # with the first entries of other imports (``_dispatch_consent``).
        known_ids: dict[str, str] = {}
        for group in outstanding.groups:
            entry = self.ledger.get(group.changes[0].partition, group.email)
            if entry is not None and entry.contact_id:
                known_ids[group.email] = entry.contact_id
        ids = consent_ids(outstanding.first_entries, known_ids, status.success_ids)
        for target, emails in outstanding.first_entries.items():
            batch = self.consent_due.get(target)
            if batch is None:
                batch = self.consent_due[target] = _ConsentBatch(target, now)
            batch.emails |= emails
            batch.ids += ids[target]
            batch.batch_ids.add(outstanding.batch_id)

    def _consent_checked(self, item: _InFlight, future: Future[Any], now: float) -> None:
        batch = item.consent
        assert batch is not None
        self.consent_checking.discard(batch.target)
        try:
            kept: set[str] = future.result()
        except Exception as error:
            # Try again later, merged with whatever joined meanwhile (the imports stay open).
            delay = error.retry_after if isinstance(error, RateLimited) else 0.0
            delay = max(delay, backoff_delay(1, self.rng.random()))
            if not isinstance(error, ApiError):
                logger.exception("consent check crashed; retrying")
            waiting = self.consent_due.get(batch.target)
            if waiting is not None:
                batch.emails |= waiting.emails
                batch.ids += waiting.ids
                batch.batch_ids |= waiting.batch_ids
            batch.since = now + delay - CONSENT_CHECK_SECONDS
            self.consent_due[batch.target] = batch
            return
        for batch_id in batch.batch_ids:
            outstanding = self.imports.get(batch_id)
            if outstanding is None or outstanding.status is None:
                continue  # its partitions moved on
            emails = outstanding.first_entries.pop(batch.target, set())
            outstanding.kept |= {(email, batch.target) for email in emails & kept}
            if not outstanding.first_entries:
                self._finish_import(outstanding, now)

    def _finish_import(self, outstanding: _Outstanding, now: float) -> None:
        """A completed import with its consent checks done: record what AC now holds."""
        assert outstanding.status is not None
        del self.imports[outstanding.batch_id]
        failed = {e.strip().lower() for e in outstanding.status.failed_emails}
        for group in outstanding.groups:
            self._release(group.email)
            applied = []
            for change in group.changes:
                if not self._owned(change, outstanding.generations):
                    continue
                if group.email in failed:
                    # AC gives no reason: the per-contact path learns it (and parks it if permanent).
                    change.force_single = True
                    self.coalescer.requeue(change, now)
                else:
                    kept = (group.email, change.target) in outstanding.kept
                    applied.append(
                        ChangeOutcome(
                            change, OutcomeKind.APPLIED, applied_at=now, consent_kept=kept
                        )
                    )
            self._record(applied, now)
        self._gauges()

    def _work_for(self, gone: set[int]) -> bool:
        """Is anything still in flight for these partitions (requests, imports)?"""
        for item in self.inflight.values():
            if item.partition in gone or any(c.partition in gone for c in item.changes):
                return True
        return any(
            c.partition in gone for o in self.imports.values() for g in o.groups for c in g.changes
        )

    def _record(self, outcomes: list[ChangeOutcome], now: float) -> None:
        """Applied (or kept) changes of one email: update the ledger, then complete their
        offsets once the broker acknowledged the ledger write."""
        if not outcomes:
            return
        if self.auth_blocked:
            logger.info("ActiveCampaign accepts the token again")
            self.auth_blocked = False
            self.metrics.auth_rejected.set(0)
        first = outcomes[0].change
        email, partition = first.email, first.partition
        entry = self.ledger.get(partition, email)
        applied_ms = int(self.wall() * 1000)
        states: list[ListState] = []
        applied: list[
            PendingChange
        ] = []  # changes AC now holds because of us (not kept, not skipped)
        for outcome in outcomes:
            change = outcome.change
            if change.plan is Plan.SKIP:
                self.metrics.changes_skipped.inc()
                continue  # riding along for the fields; the list state is unchanged
            label = change.target.label()
            previous = entry.state(label) if entry else None
            event = change.event
            # A kept opt-out riding along in an import (for the contact's fields) is still kept.
            kept = outcome.consent_kept or change.plan is Plan.CONSENT_KEPT
            if not kept:
                applied.append(change)
            if kept:
                self.metrics.consent_kept.inc()
                logger.info(
                    "the person's own unsubscribe is kept",
                    extra={"email_hash": self.hash(email), "partition": partition},
                )
            states.append(
                ListState(
                    label,
                    2 if kept else event.action.status,
                    set_by_after(change.plan, event.action, previous, kept),
                    event.event_id,
                    event.occurred_at_ms,
                    applied_ms,
                    change.partition,
                    change.offsets[-1],
                    event.audience_id,
                    event.audience_name,
                    event.campaign_id,
                    event.treatment_group,
                )
            )
        changes = [o.change for o in outcomes]
        standard, custom = contact_fields(
            changes, self.settings.attribute_map, self.settings.field_map
        )
        contact_id = next((o.contact_id for o in outcomes if o.contact_id), None)
        new_entry = merged(entry, states, contact_id, fields_hash(standard, custom) or None)
        generation = self.generation.get(partition, 0)

        def written() -> None:
            if partition not in self.assigned or self.generation.get(partition) != generation:
                return  # the partition moved on; the new owner restores this write
            for change in changes:
                for offset in change.offsets:
                    self.tracker.complete(change.partition, offset)
            for change in applied:
                self.metrics.changes_applied.labels(change.event.action.value.lower()).inc()
                age = self.wall() - change.event.occurred_at_ms / 1000.0
                self.metrics.event_to_applied.observe(max(0.0, age))

        if new_entry == entry or (entry is None and new_entry == LedgerEntry(None, 0, ())):
            written()  # nothing new to record: a replay, or an exit of a contact never ours
            return
        self.metrics.ledger_writes.inc()
        self.ledger.write(partition, email, new_entry, written)

    def _settle(self, outcome: ChangeOutcome, now: float) -> None:
        change = outcome.change
        if outcome.kind is OutcomeKind.APPLIED:
            self._record([outcome], now)
        elif outcome.kind is OutcomeKind.PERMANENT:
            error = outcome.error
            assert isinstance(error, PermanentApiError)
            logger.info(
                "ActiveCampaign refused a change; to dead-letter topic",
                extra={
                    "email_hash": self.hash(change.email),
                    "ac_status": error.status,
                    "ac_code": error.code,
                    "partition": change.partition,
                },
            )
            reason = "list_missing" if error.code == "list_missing" else "ac_rejected"
            self.dlq.send(
                DeadLetter(
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
                )
            )
        elif outcome.kind is OutcomeKind.AUTH:
            if not self.auth_blocked:
                logger.error(
                    "ActiveCampaign refused the token: all sending stops until it is accepted",
                    extra={"ac_status": outcome.error.status if outcome.error else None},
                )
            self.auth_blocked = True
            self.auth_retry_at = max(self.auth_retry_at, now + AUTH_RETRY_SECONDS)
            self.metrics.auth_rejected.set(1)
            self.coalescer.requeue(change, self.auth_retry_at)
        else:
            change.attempts += 1
            delay = backoff_delay(
                change.attempts - 1, self.rng.random(), cap=self.settings.retry_max_backoff_seconds
            )
            delay = max(delay, outcome.retry_after)
            reason = "rate_limited" if outcome.retry_after else "transient"
            self.metrics.ac_retries.labels(reason).inc()
            change.last_error = str(outcome.error) if outcome.error else "crash"
            self.coalescer.requeue(change, now + delay)

    # ---- back-pressure -------------------------------------------------------------------

    def _apply_backpressure(self) -> None:
        load = len(self.coalescer) + sum(len(f.changes) for f in self.inflight.values())
        limit = self.settings.max_pending_changes
        partitions = [TopicPartition(self.topic, p) for p in self.assigned]
        if not self.paused and load >= limit:
            self.consumer.pause(partitions)
            self.paused = True
            logger.info("pending work at its bound; partitions paused", extra={"pending": load})
        elif self.paused and load <= limit // 2:
            self.consumer.resume(partitions)
            self.paused = False
            logger.info("pending work drained; partitions resumed", extra={"pending": load})
        self.metrics.paused_partitions.set(len(partitions) if self.paused else 0)

    # ---- commits -------------------------------------------------------------------------

    def commit(self, only: set[int] | None = None) -> None:
        committable = self.tracker.committable()
        offsets = [
            TopicPartition(self.topic, p, o)
            for p, o in committable.items()
            if p in self.assigned
            and (only is None or p in only)
            and o > self.last_committed.get(p, -1)
        ]
        if not offsets:
            return
        started = self.clock()
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            logger.warning("commit failed; will retry", extra={"error": str(exc)})
            return
        self.metrics.commit_duration.observe(self.clock() - started)
        wall = self.wall()
        for tp in offsets:
            self.last_committed[tp.partition] = tp.offset
            labels = (self.topic, str(tp.partition))
            self.metrics.committed_offset.labels(*labels).set(tp.offset)
            self.metrics.last_commit_timestamp.labels(*labels).set(wall)

    def _update_lag(self) -> None:
        for partition in self.assigned:
            tp = TopicPartition(self.topic, partition)
            try:
                _low, high = self.consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            labels = (self.topic, str(partition))
            committed = self.last_committed.get(partition, -1)
            if high >= 0 and committed >= 0:
                self.metrics.consumer_lag.labels(*labels).set(max(0, high - committed))
            self.metrics.inflight_uncommitted.labels(*labels).set(
                self.tracker.outstanding(partition)
            )

    # ---- rebalance callbacks (run inside consume(), on this thread) ----------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("assign").inc()
        mine = [tp for tp in partitions if tp.topic == self.topic]
        self.broker_ok = True
        for tp in mine:
            self.assigned.add(tp.partition)
            self.generation[tp.partition] = self.generation.get(tp.partition, 0) + 1
            self.tracker.drop([tp.partition])
        # Committed offsets, the ledger and the rate share are settled by the loop right after
        # this ``consume()`` returns, before any of its records is ingested. Not here: a blocking
        # client call (committed, list_topics) inside a rebalance callback clears
        # confluent-kafka's per-call state, and the next callback of the same ``consume()``
        # aborts the process (CallState_get assertion; seen when partitions move).
        self.restoring.update(tp.partition for tp in mine)
        self.share_stale = True
        if self.paused and mine:
            consumer.pause(mine)
        self.metrics.assigned_partitions.set(len(self.assigned))
        logger.info(
            "partitions assigned", extra={"partitions": sorted(tp.partition for tp in mine)}
        )

    def _settle_assignment(self) -> None:
        """After a rebalance (outside its callbacks): read the committed offsets of new
        partitions, load their ledger, take the new share of the account budget."""
        new = sorted(self.restoring & self.assigned)
        if new:
            tps = [TopicPartition(self.topic, p) for p in new]
            try:
                for tp in self.consumer.committed(tps, timeout=10):
                    self.last_committed[tp.partition] = tp.offset if tp.offset >= 0 else -1
            except KafkaException as exc:
                logger.warning("could not read committed offsets", extra={"error": str(exc)})
            self._restore_ledger(new)  # readiness says "restoring" meanwhile
            for partition in new:
                # What the previous owner charged to these partitions in AC's last minute.
                self.import_budget.adopt(partition, self.ledger.budgets.get(partition, []))
        self.restoring.clear()
        if self.share_stale:
            self.share_stale = False
            self._update_share()

    def _restore_ledger(self, partitions: list[int]) -> None:
        """Load the ledger of newly assigned partitions before any of their changes is applied
        (the loop runs it before ingesting the records of the ``consume()`` that assigned them)."""
        if not partitions:
            return
        stats = self.ledger.restore(partitions)
        self.metrics.ledger_restore_seconds.observe(stats.seconds)
        self.metrics.ledger_restored_records.inc(stats.records)
        self.metrics.ledger_emails.set(len(self.ledger.index))
        logger.info(
            "ledger restored",
            extra={
                "partitions": stats.partitions,
                "records": stats.records,
                "emails": stats.emails,
                "seconds": round(stats.seconds, 3),
            },
        )

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("revoke").inc()
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        if not self._closing:
            self.coalescer.discard(gone)
            for item in self.inflight.values():
                if item.partition in gone:
                    item.cancel.set()  # finish the request on the wire, send no more
            deadline = self.clock() + self.settings.revoke_deadline_seconds
            while self.clock() < deadline and self._work_for(gone):
                time.sleep(0.02)  # bounded by the revoke deadline; workers are finishing
                self._drain(self.clock())
                free = self.settings.ac_concurrency - len(self.inflight)
                used = self._dispatch_polls(self.clock(), free)  # imports of these partitions
                self._dispatch_consent(self.clock(), free - used, flush=True)
            self.coalescer.discard(gone)  # retries requeued while draining
            self._flush_writes(max(0.1, deadline - self.clock()))
            self.commit(only=gone)
        self._forget(gone)
        logger.info("partitions revoked", extra={"partitions": sorted(gone)})

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels("lost").inc()
        gone = {tp.partition for tp in partitions if tp.topic == self.topic}
        self.coalescer.discard(gone)
        self._forget(gone)
        logger.warning(
            "partitions lost; their work is dropped uncommitted", extra={"partitions": sorted(gone)}
        )

    def _flush_writes(self, timeout: float) -> None:
        """Wait for dead letters and ledger writes to be acknowledged (their offsets complete)."""
        deadline = self.clock() + timeout
        self.dlq.flush(timeout)
        self.ledger.flush(max(0.0, deadline - self.clock()))

    def _forget(self, gone: set[int]) -> None:
        self.restoring -= gone
        self.ledger.forget(gone)
        self.metrics.ledger_emails.set(len(self.ledger.index))
        self.tracker.drop(gone)
        self.assigned -= gone
        for partition in gone:
            self.last_committed.pop(partition, None)
            self.published.pop(partition, None)
            labels = (self.topic, str(partition))
            for gauge in (self.metrics.consumer_lag, self.metrics.inflight_uncommitted):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
        self.metrics.assigned_partitions.set(len(self.assigned))
        # Give up the revoked share at once (before another replica takes it), from the known
        # partition count: no blocking client call may run inside a rebalance callback.
        if self.total_partitions > 0:
            self._update_share(refresh=False)
        else:
            self.share_stale = True

    def _update_share(self, *, refresh: bool = True) -> None:
        """Take the share of the account budget proportional to the partitions we own.
        ``refresh=False`` (inside a rebalance callback, where no blocking client call may run)
        uses the partition count learned last time."""
        if self.settings.ac_rate_share != "partitions":
            return
        if refresh or self.total_partitions <= 0:
            try:
                metadata = self.consumer.list_topics(self.topic, timeout=5)
                self.total_partitions = len(metadata.topics[self.topic].partitions)
            except (KafkaException, KeyError):
                logger.warning("partition count unknown; rate share unchanged")
                return
        total = self.total_partitions
        if total <= 0:
            return
        owned = frozenset(self.assigned)
        self.limiter.share(owned, total)
        self.import_budget.share(owned, total)
        logger.info(
            "rate share updated",
            extra={
                "owned_partitions": len(owned),
                "total_partitions": total,
                "requests_per_second": round(self.limiter.rate, 3),
                "imports_per_minute": self.import_budget.capacity,
            },
        )

    # ---- observation ---------------------------------------------------------------------

    def _gauges(self) -> None:
        self.metrics.imports_outstanding.set(len(self.imports))
        self.metrics.import_budget_left.set(self.import_budget.left(self.wall()))
        self.metrics.changes_pending.set(len(self.coalescer))
        self.metrics.changes_inflight.set(sum(len(f.changes) for f in self.inflight.values()))

    def _touch(self) -> None:
        self.last_heartbeat = self.clock()

    def _heartbeat(self, now: float) -> None:
        self.last_heartbeat = now
        self.metrics.heartbeat.set(self.wall())
        self.metrics.ratelimit_queue_depth.set(self.limiter.waiting)
        self.metrics.ratelimit_rate.set(self.limiter.rate)
        self.metrics.ratelimit_paused.set(1 if self.limiter.paused() else 0)
        self._gauges()
        ok, _ = self.readiness()
        self.metrics.ready.set(1 if ok else 0)

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = self.clock() - self.last_heartbeat
        return age < 60.0, {"loop_age_seconds": round(age, 3)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        detail = {
            "assigned_partitions": len(self.assigned),
            "broker_connected": self.broker_ok,
            "token_accepted": not self.auth_blocked,
            "ledger_restoring_partitions": len(self.restoring),
        }
        ready = bool(self.assigned) and self.broker_ok and not self.auth_blocked
        return ready and not self.restoring, detail

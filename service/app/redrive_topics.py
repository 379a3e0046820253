"""``redrive``'s work on the topics: read the dead-letter topic (``read_letters``), check the
candidates against the current configuration and the source topic (``check_candidates``), and
write the letters to redrive to their source partition (``write``). ``redrive.py`` runs the
steps and reports.

Invariants:
- only the selected letters are kept in memory (a large dead-letter topic is not held);
- with ``--since``, reading starts at that time (less ``SINCE_MARGIN_MS``: a letter's record
  timestamp and its ``dlq.failed_at`` come from the same clock);
- a candidate is decoded and its list named with the current configuration (one that still
  fails is reported as still failing; one whose schema cannot be fetched is unchecked); the
  source partitions are read from the candidates' offsets on, for copies already redriven
  (``redrive.from``) and later events of the same email and list;
- letters are written in source order, to their source partition, with their key, value and
  headers (``redrive_headers``: and a ``redrive.*`` group naming the redrive), and every
  acknowledgement is waited for (``WRITE_TIMEOUT_SECONDS``); one not acknowledged in time is
  reported as failed;
- nothing here prints or logs an email; progress lines go to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.app.settings import Settings
from service.core.redrive import (
    REDRIVE,
    Check,
    Criteria,
    Decision,
    Letter,
    coordinate,
    is_superseded,
    redrive_headers,
    redriven_from,
    scan_starts,
)

READ_BATCH = 2000
PROGRESS_EVERY_SECONDS = 2.0
SINCE_MARGIN_MS = 60_000  # a letter's record timestamp and its dlq.failed_at: same clock
WRITE_TIMEOUT_SECONDS = 60.0


class Progress:
    """Lines on stderr: one at the end of each step, and one every few seconds within it."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.last = time.monotonic()

    def __call__(self, text: str, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < PROGRESS_EVERY_SECONDS:
            return
        self.last = now
        print(f"ac-audience-sync {self.command}: {text}", file=sys.stderr, flush=True)


@dataclass
class Written:
    to: dict[str, tuple[int, int]]  # letter -> (partition, offset) in the source topic
    failed: dict[str, str]  # letter -> why


def _scan(
    config: Mapping[str, Any],
    topic: str,
    starts: Mapping[int, int],
    each: Callable[[Any], None],
    progress: Progress,
    what: str,
) -> int:
    from service.adapters.kafka_readers import RecordScanner

    scanner = RecordScanner(config, topic, starts)
    read = 0
    try:
        while not scanner.done():
            for record in scanner.read(READ_BATCH, 0.1):
                read += 1
                each(record)
            progress(f"{what}: {read} record(s) read")
    finally:
        scanner.close()
    progress(f"{what}: {read} record(s) read", final=True)
    return read


def read_letters(
    settings: Settings,
    config: Mapping[str, Any],
    partitions: Sequence[int],
    criteria: Criteria,
    timeout: float,
    progress: Progress,
) -> tuple[int, list[Letter]]:
    """How many letters were read, and the selected ones (only those are kept: a large
    dead-letter topic is not held in memory). With ``--since``, reading starts at that time."""
    from confluent_kafka import OFFSET_BEGINNING

    from service.adapters.kafka_readers import offsets_at

    starts = dict.fromkeys(partitions, OFFSET_BEGINNING)
    if criteria.since_ms is not None:
        found = offsets_at(
            config,
            settings.kafka_dlq_topic,
            partitions,
            criteria.since_ms - SINCE_MARGIN_MS,
            timeout,
        )
        starts = {p: o for p, o in found.items() if o >= 0}
    letters: list[Letter] = []

    def keep(record: Any) -> None:
        letter = Letter(
            record.partition,
            record.offset,
            record.timestamp_ms,
            record.key,
            record.value,
            record.headers,
        )
        if criteria.selects(letter):
            letters.append(letter)

    read = _scan(config, settings.kafka_dlq_topic, starts, keep, progress, "dead-letter topic")
    return read, letters


def check_candidates(
    settings: Settings,
    config: Mapping[str, Any],
    candidates: Sequence[Letter],
    progress: Progress,
) -> tuple[set[str], dict[str, Check]]:
    """Which candidates were redriven already (their copy is in the source topic), and what
    decoding them and reading the source topic after them says."""
    from service.app.wiring import build_decoder
    from service.core.errors import PoisonMessage, SchemaUnavailable
    from service.core.lists import ListNamer

    dlq, source = settings.kafka_dlq_topic, settings.kafka_topic
    decoder = build_decoder(settings, time.monotonic)
    namer = ListNamer(settings.list_name_template, settings.list_mapping)

    def identity(value: bytes | None) -> tuple[str, str, int] | PoisonMessage | None:
        """(email, list, occurred) of a record, its ``PoisonMessage``, or None (the registry
        could not be asked)."""
        try:
            event = decoder.decode(value)
            return event.email, namer(event).label(), event.occurred_at_ms
        except PoisonMessage as poison:
            return poison
        except SchemaUnavailable:
            return None

    checks: dict[str, Check] = {}
    known: dict[str, tuple[int, tuple[str, str, int]]] = {}  # letter -> (partition, identity)
    keys: dict[int, set[bytes]] = {}
    for letter in candidates:
        where = coordinate(dlq, letter.dlq_partition, letter.dlq_offset)
        found = identity(letter.value)
        if found is None:
            checks[where] = Check(unchecked=True)
        elif isinstance(found, PoisonMessage):
            checks[where] = Check(still_failing=f"{found.reason}: {found.detail}")
        else:
            assert letter.source_partition is not None
            known[where] = (letter.source_partition, found)
            wanted = keys.setdefault(letter.source_partition, set())
            wanted.add(found[0].encode())
            if letter.key is not None:
                wanted.add(letter.key)
    redriven: set[str] = set()
    later: dict[tuple[int, str, str], list[tuple[int, int]]] = {}
    unsure: set[tuple[int, str]] = set()  # (partition, key) with a record we could not decode

    def look(record: Any) -> None:
        redriven.update(redriven_from(record.headers, dlq))
        if record.key is None or record.key not in keys.get(record.partition, ()):
            return
        found = identity(record.value)
        if found is None:
            unsure.add((record.partition, record.key.decode("utf-8", "replace")))
        elif not isinstance(found, PoisonMessage):
            email, label, occurred = found
            later.setdefault((record.partition, email, label), []).append((record.offset, occurred))

    by_letter = {coordinate(dlq, c.dlq_partition, c.dlq_offset): c for c in candidates}
    starts = scan_starts(by_letter[where] for where in known)
    _scan(config, source, starts, look, progress, f"source topic {source}")
    for where, (partition, (email, label, occurred)) in known.items():
        letter = by_letter[where]
        assert letter.source_offset is not None
        if (partition, email) in unsure:
            checks[where] = Check(unchecked=True)
            continue
        superseded = is_superseded(
            letter.source_offset, occurred, later.get((partition, email, label), ())
        )
        checks[where] = Check(superseded=superseded)
    return redriven, checks


def write(
    settings: Settings,
    producer_config: Mapping[str, Any],
    decisions: Sequence[Decision],
    run_id: str,
    progress: Progress,
) -> Written:
    """Produce every letter to redrive to its source partition, in order; wait for the acks."""
    from confluent_kafka import Producer

    dlq, source = settings.kafka_dlq_topic, settings.kafka_topic
    producer = Producer(dict(producer_config))
    result = Written({}, {})
    chosen = [d.letter for d in decisions if d.outcome == REDRIVE]
    for number, letter in enumerate(chosen, 1):
        where = coordinate(dlq, letter.dlq_partition, letter.dlq_offset)

        def delivered(err: Any, msg: Any, where: str = where) -> None:
            if err is None:
                result.to[where] = (msg.partition(), msg.offset())
            else:
                result.failed[where] = settings.redact(err.str())

        headers: list[Any] = redrive_headers(letter, dlq, run_id, int(time.time() * 1000))
        assert letter.source_partition is not None  # screened
        while True:
            try:
                producer.produce(
                    source,
                    value=letter.value,
                    key=letter.key,
                    partition=letter.source_partition,
                    headers=headers,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
        progress(f"writing: {number} of {len(chosen)} record(s) produced")
    deadline = time.monotonic() + WRITE_TIMEOUT_SECONDS
    while len(producer) and time.monotonic() < deadline:
        producer.flush(1.0)
    for letter in chosen:
        where = coordinate(dlq, letter.dlq_partition, letter.dlq_offset)
        if where not in result.to and where not in result.failed:
            result.failed[where] = "no acknowledgement from the broker in time"
    return result

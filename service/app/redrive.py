"""``ac-audience-sync redrive``: put dead-lettered records back on the source topic.

1. Read the dead-letter topic (from ``--since``, when given) and select letters by reason,
   source partition, source offsets and time.
2. Screen them (``service/core/redrive.py``): reasons that would fail again are reported, not
   redriven, unless named with ``--reason``; nor are redriven records that failed again.
3. Check the candidates: each is decoded and its list named with the current configuration
   (one that still fails is reported); the source partitions are read from the candidates'
   offsets on, for copies already redriven (``redrive.from``) and for later events of the
   same email and list (a superseded letter is not put back).
4. Print the counts per reason. Only with ``--execute``: write the records to redrive, in
   source order, to their source partition, and wait for every acknowledgement.

Nothing here prints or logs an email; letters are named by their coordinates.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.app.audit import printable
from service.app.settings import Settings
from service.core.redrive import (
    OUTCOME_WORDS,
    REDRIVE,
    UNCHECKED,
    Check,
    Criteria,
    Decision,
    Letter,
    coordinate,
    counts,
    decide,
    is_superseded,
    redrive_headers,
    redriven_from,
    scan_starts,
    screen,
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


@dataclass(frozen=True)
class Options:
    criteria: Criteria
    execute: bool
    json: bool
    timeout: float


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


def new_run_id(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(3)


def _time(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return str(ms)


def report_json(
    settings: Settings,
    options: Options,
    read: int,
    decisions: Sequence[Decision],
    run_id: str | None,
    written: Written | None,
) -> dict[str, Any]:
    dlq = settings.kafka_dlq_topic
    records = []
    for decision in decisions:
        letter = decision.letter
        where = coordinate(dlq, letter.dlq_partition, letter.dlq_offset)
        item: dict[str, Any] = {
            "dlq_partition": letter.dlq_partition,
            "dlq_offset": letter.dlq_offset,
            "reason": letter.reason,
            "source_partition": letter.source_partition,
            "source_offset": letter.source_offset,
            "failed_at": _time(letter.failed_at_ms),
            "redrives_before": letter.redrives,
            "outcome": decision.outcome,
        }
        if decision.detail:
            item["detail"] = decision.detail
        if written is not None and where in written.to:
            partition, offset = written.to[where]
            item["redriven_to"] = {"partition": partition, "offset": offset}
        if written is not None and where in written.failed:
            item["write_failed"] = written.failed[where]
        records.append(item)
    to_redrive = sum(1 for d in decisions if d.outcome == REDRIVE)
    return {
        "dry_run": not options.execute,
        "dlq_topic": dlq,
        "source_topic": settings.kafka_topic,
        "run_id": run_id,
        "read": read,
        "selected": len(decisions),
        "to_redrive": to_redrive,
        "redriven": len(written.to) if written else 0,
        "failed": len(written.failed) if written else 0,
        "reasons": counts(decisions),
        "records": records,
    }


def report_lines(summary: Mapping[str, Any]) -> list[str]:
    lines = [
        f"dead-letter topic {printable(summary['dlq_topic'])}: {summary['read']} record(s) read, "
        f"{summary['selected']} selected (source topic {printable(summary['source_topic'])})"
    ]
    for reason, found in summary["reasons"].items():
        parts = [
            f"{n} {OUTCOME_WORDS.get(outcome, outcome)}"
            for outcome, n in found.items()
            if outcome != "selected"
        ]
        lines.append(f"  {printable(reason)}: {found['selected']} selected: " + ", ".join(parts))
    for item in summary["records"]:
        if item["outcome"] == "still_failing":
            lines.append(
                f"  still failing: dlq {item['dlq_partition']}/{item['dlq_offset']} (source "
                f"{item['source_partition']}/{item['source_offset']}): {printable(item['detail'])}"
            )
    if summary["dry_run"]:
        lines.append(
            f"dry run: {summary['to_redrive']} record(s) would be redriven; nothing was written "
            "(--execute to redrive)"
        )
    elif summary["run_id"] is None:
        lines.append("nothing to redrive: nothing was written")
    else:
        failed = summary["failed"]
        lines.append(
            f"redrive {summary['run_id']}: {summary['redriven']} of {summary['to_redrive']} "
            f"record(s) written to {printable(summary['source_topic'])}"
            + (f", {failed} failed (run again: what landed is skipped)" if failed else "")
        )
    return lines


def run(settings: Settings, options: Options, progress: Progress) -> int:
    """Everything after the configuration: raises ``BrokerUnreachable``,
    ``BrokerRefusedCredentials``, ``KafkaException``, ``LookupError`` or ``ConfigError`` for
    the command's shell to turn into an exit status."""
    from service.app.check import list_topics
    from service.app.cli import EXIT_FAILED, EXIT_OK
    from service.app.logs import quiet_kafka_logger
    from service.core.errors import ConfigError

    def quiet(config: Mapping[str, Any]) -> dict[str, Any]:
        return {**config, "logger": quiet_kafka_logger()}

    metadata = list_topics(settings, options.timeout)
    dlq_meta = metadata.topics.get(settings.kafka_dlq_topic)
    if dlq_meta is None or dlq_meta.error is not None or not dlq_meta.partitions:
        raise ConfigError(
            "KAFKA_DLQ_TOPIC", f"{settings.kafka_dlq_topic} does not exist (has `run` run?)"
        )
    source_meta = metadata.topics.get(settings.kafka_topic)
    if source_meta is None or source_meta.error is not None or not source_meta.partitions:
        raise ConfigError("KAFKA_TOPIC", f"{settings.kafka_topic} does not exist")
    config = quiet(settings.consumer_config())
    criteria = options.criteria
    read, selected = read_letters(
        settings, config, sorted(dlq_meta.partitions), criteria, options.timeout, progress
    )
    candidates = [
        letter for letter in selected if screen(letter, criteria, settings.kafka_topic) is None
    ]
    redriven, checks = check_candidates(settings, config, candidates, progress)
    decisions = decide(
        selected, criteria, settings.kafka_dlq_topic, settings.kafka_topic, redriven, checks
    )
    run_id = written = None
    if options.execute and any(d.outcome == REDRIVE for d in decisions):
        run_id = new_run_id(time.time())
        written = write(settings, quiet(settings.producer_config()), decisions, run_id, progress)
    summary = report_json(settings, options, read, decisions, run_id, written)
    if options.json:
        print(json.dumps(summary, indent=2))
    else:
        print("\n".join(report_lines(summary)))
    unchecked = any(d.outcome == UNCHECKED for d in decisions)
    return EXIT_FAILED if unchecked or (written is not None and written.failed) else EXIT_OK

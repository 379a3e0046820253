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

Here: the steps in order (``run``), and the report (``report_json``, ``report_lines``); what
reads and writes the topics (steps 1, 3 and 4's writing) is ``redrive_topics.py``. Nothing
here prints or logs an email; letters are named by their coordinates.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.app.audit import printable
from service.app.redrive_topics import Progress, Written, check_candidates, read_letters, write
from service.app.settings import Settings
from service.core.redrive import (
    OUTCOME_WORDS,
    REDRIVE,
    UNCHECKED,
    Criteria,
    Decision,
    coordinate,
    counts,
    decide,
    screen,
)


@dataclass(frozen=True)
class Options:
    criteria: Criteria
    execute: bool
    json: bool
    timeout: float


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
    from service.app.cli_common import EXIT_FAILED, EXIT_OK
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

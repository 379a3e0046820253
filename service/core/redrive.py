"""``redrive``: which dead-lettered records go back to the source topic, and with which
headers. Pure: the shell (``service/app/redrive.py``) reads the topics and hands in what it
found.

A *letter* is one record of the dead-letter topic (``service/adapters/dlq.py`` wrote it: the
parked record's key and value, ``dlq.*`` headers, then the record's own headers). Redriving it
produces its key and value again to ``dlq.source.partition`` of the source topic (the email's
partition: its ledger lives there), with the record's own headers and one *redrive group*:

- ``redrive.id``: the run (one id per ``redrive --execute``);
- ``redrive.from``: the letter, ``<dlq topic>/<partition>/<offset>``;
- ``redrive.at``: when (epoch ms);
- every ``dlq.*`` header of the letter as ``redrive.dlq.*`` (why it was parked, from where).

A redriven record that fails again is parked with its headers (the DLQ writer keeps them), so
the new letter holds the new ``dlq.*`` and every earlier redrive group, oldest first: the whole
history. Redriving it again appends a group.

**Never twice by accident.** The redriven record is its own receipt: a letter counts as
redriven when a record of the source topic names it in a ``redrive.from`` header (of any
group). The shell reads the source partitions from the letters' source offsets on before it
writes anything, so a second run, or a run after a crash half-way, skips every letter whose
copy is already on the broker; there is no marker that could be written without the copy or
the copy without the marker.

**Not looped.** A letter whose cause lies in the record itself fails again, so it is reported,
not redriven, unless its reason is named with ``--reason`` (after a fix of the service or its
configuration). Every candidate is also decoded and named with the current configuration
first: one that still fails is reported as ``still_failing`` whatever was asked. A letter that
is itself a redriven record that failed again is redriven only when its reason is named. A
letter whose event is *superseded* (a later record of the same partition, email and list with
an event at least as recent is in the source topic) is not redriven: putting it back would
apply an older state over a newer one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

DLQ_PREFIX = "dlq."
REDRIVE_PREFIX = "redrive."
REDRIVE_ID = "redrive.id"
REDRIVE_FROM = "redrive.from"
REDRIVE_AT = "redrive.at"

# Reasons whose cause lies outside the record: it may have been fixed since.
REDRIVABLE = frozenset({"list_missing", "list_limit", "retries_exhausted", "unknown_schema"})

# Why the other reasons are not redriven unless named (the record itself is the cause).
NOT_REDRIVABLE_WHY = {
    "undecodable": "the bytes are not Avro of their schema",
    "bad_magic": "the value is not in Confluent wire format",
    "incompatible_schema": "the writer schema of its id cannot be read as ours",
    "missing_field": "a required field is missing or blank",
    "invalid_field": "a field is out of range",
    "invalid_email": "the email is not valid",
    "no_list_name": "the list name template gives no name (fixed by a configuration change?)",
    "ac_rejected": "ActiveCampaign refused the change (fix it in AC first)",
}

# Outcomes, in the order they are decided.
UNREADABLE = "unreadable"  # not a letter of ours: no reason or source coordinates
OTHER_TOPIC = "other_topic"  # parked from another source topic
ALREADY_REDRIVEN = "already_redriven"
NOT_REDRIVABLE = "not_redrivable"  # its reason is not redriven unless named
FAILED_AFTER_REDRIVE = "failed_after_redrive"  # a redriven record that failed again
UNCHECKED = "unchecked"  # its writer schema could not be fetched now: not checked
STILL_FAILING = "still_failing"  # decoding or naming its list fails now
SUPERSEDED = "superseded"
OVER_LIMIT = "over_limit"
REDRIVE = "redrive"

OUTCOME_WORDS = {
    REDRIVE: "to redrive",
    ALREADY_REDRIVEN: "already redriven",
    SUPERSEDED: "superseded by a later event of the same email and list",
    NOT_REDRIVABLE: "not redriven unless --reason names it",
    FAILED_AFTER_REDRIVE: "failed again after a redrive (--reason to redrive again)",
    STILL_FAILING: "still failing with the current configuration",
    UNCHECKED: "not checked (schema registry unavailable)",
    OVER_LIMIT: "over --limit",
    OTHER_TOPIC: "parked from another source topic",
    UNREADABLE: "not a dead-letter record of this service",
}


def header(headers: Iterable[tuple[str, bytes | None]], name: str) -> str | None:
    """The last value of header ``name`` (None: absent)."""
    found: str | None = None
    for key, value in headers:
        if key == name:
            found = (value or b"").decode("utf-8", "replace")
    return found


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def coordinate(topic: str, partition: int, offset: int) -> str:
    return f"{topic}/{partition}/{offset}"


@dataclass(frozen=True)
class Letter:
    """One record of the dead-letter topic."""

    dlq_partition: int
    dlq_offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]

    @property
    def reason(self) -> str | None:
        return header(self.headers, "dlq.reason")

    @property
    def source_topic(self) -> str | None:
        return header(self.headers, "dlq.source.topic")

    @property
    def source_partition(self) -> int | None:
        return _int(header(self.headers, "dlq.source.partition"))

    @property
    def source_offset(self) -> int | None:
        return _int(header(self.headers, "dlq.source.offset"))

    @property
    def failed_at_ms(self) -> int:
        return _int(header(self.headers, "dlq.failed_at")) or self.timestamp_ms

    @property
    def redrives(self) -> int:
        """How many times the record was redriven before it was parked here."""
        return sum(1 for key, _ in self.headers if key == REDRIVE_ID)

    def sort_key(self) -> tuple[int, int, int, int]:
        return (
            self.source_partition if self.source_partition is not None else -1,
            self.source_offset if self.source_offset is not None else -1,
            self.dlq_partition,
            self.dlq_offset,
        )


@dataclass(frozen=True)
class Criteria:
    """What the operator selected. ``reasons`` named also force them (see the module doc)."""

    reasons: frozenset[str] | None = None
    partitions: frozenset[int] | None = None  # source partitions
    from_offset: int | None = None  # source offsets, inclusive
    to_offset: int | None = None
    since_ms: int | None = None  # when parked (``dlq.failed_at``), inclusive
    until_ms: int | None = None  # exclusive
    limit: int | None = None  # at most this many redriven

    def selects(self, letter: Letter) -> bool:
        if self.reasons is not None and letter.reason not in self.reasons:
            return False
        if self.partitions is not None and letter.source_partition not in self.partitions:
            return False
        offset = letter.source_offset
        if self.from_offset is not None and (offset is None or offset < self.from_offset):
            return False
        if self.to_offset is not None and (offset is None or offset > self.to_offset):
            return False
        at = letter.failed_at_ms
        if self.since_ms is not None and at < self.since_ms:
            return False
        return self.until_ms is None or at < self.until_ms

    def forced(self, reason: str | None) -> bool:
        return self.reasons is not None and reason in self.reasons


def screen(letter: Letter, criteria: Criteria, source_topic: str) -> str | None:
    """The outcome decided from the letter alone; None: a candidate, to be checked against
    the source topic and the decoder."""
    if letter.reason is None or letter.source_partition is None or letter.source_offset is None:
        return UNREADABLE
    if letter.source_topic != source_topic:
        return OTHER_TOPIC
    forced = criteria.forced(letter.reason)
    if letter.reason not in REDRIVABLE and not forced:
        return NOT_REDRIVABLE
    if letter.redrives and not forced:
        return FAILED_AFTER_REDRIVE
    return None


@dataclass(frozen=True)
class Check:
    """What the shell found about one candidate."""

    still_failing: str | None = None  # the reason decoding or naming fails now
    unchecked: bool = False  # the registry could not be asked
    superseded: bool = False


@dataclass(frozen=True)
class Decision:
    letter: Letter
    outcome: str
    detail: str = ""


def is_superseded(offset: int, occurred_ms: int, later: Iterable[tuple[int, int]]) -> bool:
    """A record at ``offset`` whose event occurred at ``occurred_ms`` is superseded by any
    (offset, occurred) of the same partition, email and list after it with an event at least
    as recent. An older event written later (a redriven copy of an older letter) is not."""
    return any(o > offset and t >= occurred_ms for o, t in later)


def decide(
    letters: Iterable[Letter],
    criteria: Criteria,
    dlq_topic: str,
    source_topic: str,
    redriven: Iterable[str],
    checks: Mapping[str, Check],
) -> list[Decision]:
    """Every selected letter's outcome, in source order (partition, offset): the order in
    which the records to redrive are written, so an email's events keep their order."""
    done = set(redriven)
    decisions: list[Decision] = []
    chosen = 0
    for letter in sorted(letters, key=Letter.sort_key):
        where = coordinate(dlq_topic, letter.dlq_partition, letter.dlq_offset)
        outcome = screen(letter, criteria, source_topic)
        detail = ""
        if outcome == NOT_REDRIVABLE:
            detail = NOT_REDRIVABLE_WHY.get(letter.reason or "", "")
        if outcome is None and where in done:
            outcome = ALREADY_REDRIVEN
        if outcome is None:
            check = checks.get(where, Check())
            if check.unchecked:
                outcome = UNCHECKED
            elif check.still_failing is not None:
                outcome, detail = STILL_FAILING, check.still_failing
            elif check.superseded:
                outcome = SUPERSEDED
            elif criteria.limit is not None and chosen >= criteria.limit:
                outcome = OVER_LIMIT
            else:
                outcome = REDRIVE
                chosen += 1
        decisions.append(Decision(letter, outcome, detail))
    return decisions


def redrive_headers(
    letter: Letter, dlq_topic: str, run_id: str, now_ms: int
) -> list[tuple[str, bytes]]:
    """The record's own headers (earlier redrive groups included), then this redrive's group."""
    own = [(k, v) for k, v in letter.headers if not k.startswith(DLQ_PREFIX)]
    group = [
        (REDRIVE_ID, run_id.encode()),
        (REDRIVE_FROM, coordinate(dlq_topic, letter.dlq_partition, letter.dlq_offset).encode()),
        (REDRIVE_AT, str(now_ms).encode()),
    ]
    group += [(REDRIVE_PREFIX + k, v) for k, v in letter.headers if k.startswith(DLQ_PREFIX)]
    return own + group


def redriven_from(headers: Iterable[tuple[str, bytes | None]], dlq_topic: str) -> list[str]:
    """The letters of ``dlq_topic`` a source record is a redriven copy of (every group)."""
    prefix = dlq_topic + "/"
    found = []
    for key, value in headers:
        if key == REDRIVE_FROM and value is not None:
            text = value.decode("utf-8", "replace")
            if text.startswith(prefix):
                found.append(text)
    return found


def scan_starts(candidates: Iterable[Letter]) -> dict[int, int]:
    """Per source partition, the first offset to read: after the earliest candidate's record
    (its redriven copies and the records that supersede it all come later)."""
    starts: dict[int, int] = {}
    for letter in candidates:
        partition, offset = letter.source_partition, letter.source_offset
        if partition is None or offset is None:
            continue
        starts[partition] = min(starts.get(partition, offset + 1), offset + 1)
    return starts


def counts(decisions: Sequence[Decision]) -> dict[str, dict[str, int]]:
    """reason -> outcome -> letters (reasons and outcomes sorted; ``selected`` first)."""
    by_reason: dict[str, Counter[str]] = {}
    for decision in decisions:
        reason = decision.letter.reason or "(none)"
        by_reason.setdefault(reason, Counter())[decision.outcome] += 1
    return {
        reason: {"selected": sum(found.values()), **dict(sorted(found.items()))}
        for reason, found in sorted(by_reason.items())
    }


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: float) -> int:
    """Epoch milliseconds from ``text``: an ISO 8601 date or time (UTC unless it has an
    offset), or a duration before ``now`` (``90s``, ``30m``, ``12h``, ``7d``, ``2w``).
    ``ValueError`` for anything else."""
    value = text.strip()
    match = _DURATION.fullmatch(value)
    if match:
        return int((now - float(match.group(1)) * _UNIT[match.group(2)]) * 1000)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither an ISO 8601 time (2025-01-31T12:00:00Z) nor a duration "
            "(30m, 12h, 7d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)

"""``redrive``'s decisions (``service/core/redrive.py``): selection, what is redriven by default,
the headers that carry the history, and that nothing is ever redriven twice."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.redrive import (
    ALREADY_REDRIVEN,
    FAILED_AFTER_REDRIVE,
    NOT_REDRIVABLE,
    OTHER_TOPIC,
    OVER_LIMIT,
    REDRIVABLE,
    REDRIVE,
    STILL_FAILING,
    SUPERSEDED,
    UNCHECKED,
    UNREADABLE,
    Check,
    Criteria,
    Letter,
    coordinate,
    counts,
    decide,
    header,
    is_superseded,
    parse_time,
    redrive_headers,
    redriven_from,
    scan_starts,
    screen,
)
from service.metrics import DLQ_REASONS

DLQ, SOURCE = "t.dlq", "t"


def letter(
    reason: str = "list_missing",
    *,
    partition: int = 0,
    offset: int = 10,
    dlq_partition: int = 0,
    dlq_offset: int = 0,
    failed_at: int = 1_000_000,
    topic: str = SOURCE,
    extra: tuple[tuple[str, bytes], ...] = (),
) -> Letter:
    headers = (
        ("dlq.reason", reason.encode()),
        ("dlq.error_class", b"PermanentApiError"),
        ("dlq.detail", b"no list"),
        ("dlq.source.topic", topic.encode()),
        ("dlq.source.partition", str(partition).encode()),
        ("dlq.source.offset", str(offset).encode()),
        ("dlq.failed_at", str(failed_at).encode()),
        *extra,
    )
    return Letter(dlq_partition, dlq_offset, failed_at + 3, b"a@b.co", b"value", headers)


def where(item: Letter) -> str:
    return coordinate(DLQ, item.dlq_partition, item.dlq_offset)


def test_a_letter_reads_its_headers() -> None:
    item = letter(partition=3, offset=42, failed_at=7)
    assert (item.reason, item.source_topic, item.source_partition, item.source_offset) == (
        "list_missing",
        SOURCE,
        3,
        42,
    )
    assert item.failed_at_ms == 7
    assert item.redrives == 0
    bare = Letter(0, 0, 99, None, None, (("dlq.source.offset", b"x"),))
    assert bare.reason is None and bare.source_offset is None and bare.failed_at_ms == 99
    assert header((("a", b"1"), ("a", b"2"), ("b", None)), "a") == "2"
    assert header((("b", None),), "b") == ""


def test_every_reason_the_service_parks_is_classified() -> None:
    from service.core.redrive import NOT_REDRIVABLE_WHY

    assert set(DLQ_REASONS) == REDRIVABLE | set(NOT_REDRIVABLE_WHY)
    assert not REDRIVABLE & set(NOT_REDRIVABLE_WHY)


def test_criteria_select_by_reason_partition_offsets_and_time() -> None:
    items = [
        letter("list_missing", partition=0, offset=5, failed_at=100),
        letter("invalid_email", partition=1, offset=6, failed_at=200),
        letter("list_missing", partition=1, offset=20, failed_at=300),
    ]

    def chosen(criteria: Criteria) -> list[int]:
        return [i for i, item in enumerate(items) if criteria.selects(item)]

    assert chosen(Criteria()) == [0, 1, 2]
    assert chosen(Criteria(reasons=frozenset({"list_missing"}))) == [0, 2]
    assert chosen(Criteria(partitions=frozenset({1}))) == [1, 2]
    assert chosen(Criteria(from_offset=6, to_offset=19)) == [1]
    assert chosen(Criteria(from_offset=6)) == [1, 2]
    assert chosen(Criteria(since_ms=200)) == [1, 2]  # inclusive
    assert chosen(Criteria(until_ms=300)) == [0, 1]  # exclusive
    unreadable = Letter(0, 0, 0, None, None, ())
    assert not Criteria(from_offset=0).selects(unreadable)


def test_screen_redrives_only_outside_causes_unless_a_reason_is_named() -> None:
    assert screen(letter("list_missing"), Criteria(), SOURCE) is None
    assert screen(letter("retries_exhausted"), Criteria(), SOURCE) is None
    assert screen(letter("invalid_email"), Criteria(), SOURCE) == NOT_REDRIVABLE
    assert screen(letter("ac_rejected"), Criteria(), SOURCE) == NOT_REDRIVABLE
    named = Criteria(reasons=frozenset({"ac_rejected"}))
    assert screen(letter("ac_rejected"), named, SOURCE) is None
    assert screen(letter("list_missing", topic="other"), Criteria(), SOURCE) == OTHER_TOPIC
    assert screen(Letter(0, 0, 0, None, None, ()), Criteria(), SOURCE) == UNREADABLE


def test_a_record_that_failed_again_after_a_redrive_needs_its_reason_named() -> None:
    first = letter("list_missing", dlq_offset=1)
    again = Letter(
        0,
        9,
        5,
        first.key,
        first.value,
        tuple(letter("list_missing").headers) + tuple(redrive_headers(first, DLQ, "r1", 5)),
    )
    assert again.redrives == 1
    assert screen(again, Criteria(), SOURCE) == FAILED_AFTER_REDRIVE
    assert screen(again, Criteria(reasons=frozenset({"list_missing"})), SOURCE) is None


def test_redrive_headers_keep_the_records_own_and_add_a_group() -> None:
    item = letter(extra=(("trace-id", b"abc"),), dlq_partition=2, dlq_offset=7)
    headers = redrive_headers(item, DLQ, "run-1", 1234)
    assert ("trace-id", b"abc") in headers
    assert not [k for k, _ in headers if k.startswith("dlq.")]
    assert ("redrive.id", b"run-1") in headers
    assert ("redrive.from", b"t.dlq/2/7") in headers
    assert ("redrive.at", b"1234") in headers
    assert ("redrive.dlq.reason", b"list_missing") in headers
    assert ("redrive.dlq.source.offset", b"10") in headers


def test_a_second_redrive_keeps_the_first_groups_history() -> None:
    first = letter(dlq_offset=1)
    copy = redrive_headers(first, DLQ, "run-1", 1)
    # parked again: new dlq.* first, then the record's own headers (dlq.py)
    parked = Letter(0, 5, 2, first.key, first.value, (("dlq.reason", b"ac_rejected"), *tuple(copy)))
    second = redrive_headers(parked, DLQ, "run-2", 3)
    assert [v for k, v in second if k == "redrive.id"] == [b"run-1", b"run-2"]
    assert [v for k, v in second if k == "redrive.dlq.reason"] == [b"list_missing", b"ac_rejected"]
    assert redriven_from(second, DLQ) == ["t.dlq/0/1", "t.dlq/0/5"]
    assert redriven_from(second, "elsewhere.dlq") == []


def test_decide_orders_by_source_and_skips_what_was_redriven() -> None:
    a = letter(partition=1, offset=5, dlq_offset=0)
    b = letter(partition=0, offset=9, dlq_offset=1)
    c = letter(partition=0, offset=3, dlq_offset=2)
    decisions = decide([a, b, c], Criteria(), DLQ, SOURCE, {where(b)}, {})
    assert [(d.letter, d.outcome) for d in decisions] == [
        (c, REDRIVE),
        (b, ALREADY_REDRIVEN),
        (a, REDRIVE),
    ]


def test_decide_reports_checks_and_applies_the_limit_after_them() -> None:
    items = [letter(offset=i, dlq_offset=i) for i in range(6)]
    checks = {
        where(items[0]): Check(still_failing="unknown_schema: id 9"),
        where(items[1]): Check(unchecked=True),
        where(items[2]): Check(superseded=True),
    }
    decisions = decide(items, Criteria(limit=2), DLQ, SOURCE, (), checks)
    assert [d.outcome for d in decisions] == [
        STILL_FAILING,
        UNCHECKED,
        SUPERSEDED,
        REDRIVE,
        REDRIVE,
        OVER_LIMIT,
    ]
    assert decisions[0].detail == "unknown_schema: id 9"
    assert counts(decisions) == {
        "list_missing": {
            "selected": 6,
            OVER_LIMIT: 1,
            REDRIVE: 2,
            STILL_FAILING: 1,
            SUPERSEDED: 1,
            UNCHECKED: 1,
        }
    }


def test_not_redrivable_letters_say_why() -> None:
    [decision] = decide([letter("invalid_email")], Criteria(), DLQ, SOURCE, (), {})
    assert decision.outcome == NOT_REDRIVABLE
    assert "email" in decision.detail


def test_superseded_by_a_later_record_with_an_event_at_least_as_recent() -> None:
    assert is_superseded(10, 500, [(11, 500)])
    assert is_superseded(10, 500, [(3, 100), (12, 900)])
    assert not is_superseded(10, 500, [(11, 499)])  # an older event written later
    assert not is_superseded(10, 500, [(9, 900), (10, 900)])  # before it, or itself
    assert not is_superseded(10, 500, [])


def test_scan_starts_after_the_earliest_candidate_per_partition() -> None:
    items = [letter(partition=0, offset=8), letter(partition=0, offset=3), letter(partition=2)]
    assert scan_starts(items) == {0: 4, 2: 11}


def test_parse_time() -> None:
    now = 1_700_000_000.0
    assert parse_time("30m", now) == int((now - 1800) * 1000)
    assert parse_time("7d", now) == int((now - 7 * 86400) * 1000)
    assert parse_time("1.5h", now) == int((now - 5400) * 1000)
    utc = datetime(2025, 1, 31, 12, tzinfo=UTC).timestamp() * 1000
    assert parse_time("2025-01-31T12:00:00Z", now) == utc
    assert parse_time("2025-01-31T12:00:00", now) == utc  # UTC unless an offset is given
    assert parse_time("2025-01-31T14:00:00+02:00", now) == utc
    assert parse_time("2025-01-31", now) == utc - 12 * 3_600_000
    for bad in ("yesterday", "12", "-5m", ""):
        with pytest.raises(ValueError, match="ISO 8601"):
            parse_time(bad, now)


letters = st.builds(
    letter,
    reason=st.sampled_from(DLQ_REASONS),
    partition=st.integers(0, 2),
    offset=st.integers(0, 50),
    dlq_partition=st.integers(0, 2),
    dlq_offset=st.integers(0, 1000),
)


@given(
    st.lists(letters, max_size=25, unique_by=lambda x: (x.dlq_partition, x.dlq_offset)),
    st.sets(st.integers(0, 1000)),
    st.none() | st.integers(0, 5),
    st.none() | st.frozensets(st.sampled_from(DLQ_REASONS)),
)
def test_never_twice_never_over_the_limit_always_in_source_order(
    items: list[Letter], done_offsets: set[int], limit: int | None, reasons: frozenset[str] | None
) -> None:
    redriven = {coordinate(DLQ, 0, o) for o in done_offsets}
    criteria = Criteria(reasons=reasons, limit=limit)
    decisions = decide(items, criteria, DLQ, SOURCE, redriven, {})
    chosen = [d.letter for d in decisions if d.outcome == REDRIVE]
    assert not {where(x) for x in chosen} & redriven
    assert limit is None or len(chosen) <= limit
    assert all(
        x.reason in REDRIVABLE or (reasons is not None and x.reason in reasons) for x in chosen
    )
    assert [x.sort_key() for x in chosen] == sorted(x.sort_key() for x in chosen)
    # Once its copy is on the source topic (the receipt), a second run never picks it again.
    again = decide(items, criteria, DLQ, SOURCE, redriven | {where(x) for x in chosen}, {})
    assert not {where(d.letter) for d in again if d.outcome == REDRIVE} & {where(x) for x in chosen}

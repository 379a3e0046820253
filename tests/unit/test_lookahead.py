"""The read-ahead's index (``core/lookahead.py``) and its stage (``pipeline/ahead.py``)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.adapters.kafka import Record
from service.core.coalesce import Coalescer, ListRef
from service.core.codec import EventDecoder, encode_event, load_reader_schema
from service.core.lists import ListNamer
from service.core.lookahead import CONTINUES, SUPERSEDED, Backlog
from service.core.model import Action, MembershipEvent
from service.pipeline.ahead import ReadAhead

A = ListRef(name="A")
B = ListRef(name="B")


def test_the_last_record_of_a_key_supersedes_the_earlier_ones_and_only_them() -> None:
    backlog = Backlog(None)
    for offset, key in enumerate([("x", A), ("x", B), ("x", A), ("y", A)]):
        backlog.read(offset)
        backlog.add(key, offset, 1000 + offset)
    assert backlog.keys == 3 and backlog.end == 4
    assert backlog.superseded(0)
    assert not backlog.superseded(2)  # the last one: applied
    assert not backlog.superseded(1)  # another list of the same email
    assert not backlog.superseded(3)
    assert not backlog.superseded(4)  # never read ahead
    assert backlog.sealed and backlog.keys == 3  # the first question forgot the keys


def test_records_past_the_end_read_ahead_are_never_superseded() -> None:
    backlog = Backlog(None)
    backlog.read(7)
    backlog.add(("x", A), 7, 0)
    assert backlog.end == 8
    assert not backlog.superseded(8)
    assert not backlog.superseded(9)
    assert backlog.passed(7) and not backlog.passed(6)


def test_an_unreadable_record_read_ahead_supersedes_nothing() -> None:
    backlog = Backlog(None)
    backlog.read(0)
    backlog.add(("x", A), 0, 0)
    backlog.read(1)  # poison, or its schema unavailable: read, not indexed
    assert not backlog.superseded(0)
    assert backlog.end == 2 and backlog.records == 2


def test_a_stale_later_record_does_not_supersede_the_one_the_guard_keeps() -> None:
    backlog = Backlog(60_000)
    backlog.add(("x", A), 0, 1_000_000)
    backlog.add(("x", A), 1, 1_000_000 - 60_001)  # a late copy, older than the guard allows
    for offset in (0, 1):
        backlog.read(offset)
    assert not backlog.superseded(0)  # the guard keeps it, as the coalescer does
    assert not backlog.superseded(1)  # processed: the coalescer or ledger folds it


def test_a_newer_record_after_a_stale_one_supersedes_both() -> None:
    backlog = Backlog(60_000)
    backlog.add(("x", A), 0, 1_000_000)
    backlog.add(("x", A), 1, 1_000_000 - 60_001)  # stale: the guard keeps offset 0
    backlog.add(("x", A), 2, 1_000_000 - 60_000)  # within the tolerance: replaces
    backlog.add(("y", A), 3, 0)
    backlog.add(("y", A), 4, -60_001)  # stale after y's kept record, and stays so
    for offset in range(5):
        backlog.read(offset)
    assert [backlog.superseded(o) for o in range(5)] == [True, True, False, False, False]


def test_sealing_forgets_the_keys_and_keeps_a_byte_per_record() -> None:
    backlog = Backlog(None)
    for offset in range(100, 10_100):
        backlog.read(offset)
        backlog.add((f"p{offset % 1000}", A), offset, offset)
    assert backlog.keys == 1000
    assert backlog.informs()
    assert backlog.sealed and backlog.keys == 1000 and not backlog._after
    assert len(backlog._marks) == 10_000  # one byte per record read ahead
    assert backlog.superseded(100) and not backlog.superseded(10_099)
    assert not backlog.superseded(99)  # before the first one read ahead
    with pytest.raises(RuntimeError, match=r"^the backlog is sealed$"):
        backlog.add(("x", A), 10_100, 0)


def test_a_backlog_whose_records_are_all_last_of_their_email_changes_nothing() -> None:
    backlog = Backlog(None)
    for offset, email in enumerate(["p", "q", "r"]):
        backlog.read(offset)
        backlog.add((email, A), offset, 0)
    assert not backlog.informs()


def test_a_backlog_without_a_superseded_record_still_holds_an_emails_first_list() -> None:
    backlog = Backlog(None)
    for offset, key in enumerate([("p", A), ("p", B)]):
        backlog.read(offset)
        backlog.add(key, offset, 0)
    assert backlog.informs()
    assert backlog.mark(0) == CONTINUES


def test_records_are_indexed_in_offset_order() -> None:
    backlog = Backlog(None)
    backlog.add(("x", A), 5, 0)
    with pytest.raises(ValueError, match="before the first"):
        backlog.add(("x", A), 4, 0)


def test_negative_event_times_pack_below_the_offset() -> None:
    backlog = Backlog(10)
    backlog.add(("x", A), 5, -(2**62))
    backlog.add(("x", A), 6, -(2**62) - 11)  # stale beside it
    backlog.read(6)
    assert not backlog.superseded(5)


EVENTS = st.lists(
    st.tuples(
        st.sampled_from(["p@x.com", "q@x.com"]), st.sampled_from([A, B]), st.integers(0, 200)
    ),
    max_size=40,
)


@given(EVENTS, st.sampled_from([None, 0, 50]))
def test_only_the_record_the_coalescer_would_keep_of_each_key_is_left(
    events: list[tuple[str, ListRef, int]], tolerance: int | None
) -> None:
    """Whatever the order and the event times: with the whole backlog pending at once, the
    coalescer keeps one record per key; the read-ahead supersedes exactly the records before
    it, so the one the coalescer keeps is never skipped and nothing earlier is sent."""
    coalescer = Coalescer(5.0, tolerance)
    backlog = Backlog(tolerance)
    for offset, (email, target, at) in enumerate(events):
        event = MembershipEvent(f"e{offset}", at, email, "aud", target.label(), Action.ENTERED)
        coalescer.add(0, target, event, None, offset, 0.0)
        backlog.read(offset)
        backlog.add((email, target), offset, at)
    kept = {
        (c.email, c.target): int(c.event.event_id[1:])
        for group in coalescer.take_due(10.0, limit=100, busy=set())
        for c in group
    }
    for offset, (email, target, _) in enumerate(events):
        winner = kept[(email, target)]
        assert backlog.superseded(offset) == (offset < winner)


# ---- the stage ---------------------------------------------------------------------------


class FakeReader:
    """Partitions' records from their start offsets, ``size`` per read."""

    def __init__(self, rows: list[Record], size: int = 2) -> None:
        self.rows, self.size, self.closed = rows, size, False

    def read(self, max_records: int, timeout: float) -> list[Record]:
        chunk, self.rows = self.rows[: self.size], self.rows[self.size :]
        return chunk

    def done(self) -> bool:
        return not self.rows

    def close(self) -> None:
        self.closed = True


SCHEMA = load_reader_schema()


def value(email: str, audience: str, action: str, at: int = 0) -> bytes:
    return encode_event(
        {
            "event_id": f"{email}-{audience}-{at}",
            "occurred_at": 1_767_225_600_000 + at,
            "email": email,
            "audience_id": audience,
            "audience_name": audience,
            "action": action,
            "campaign_id": None,
            "treatment_group": None,
            "attributes": {},
        },
        SCHEMA,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.001  # every look at the clock costs a millisecond
        return self.now


def stage(
    log: Mapping[int, list[bytes | None]], *, max_keys: int = 100, max_seconds: float = 60.0
) -> tuple[ReadAhead, list[dict[int, int]], list[FakeReader]]:
    asked: list[dict[int, int]] = []
    made: list[FakeReader] = []

    def readers(topic: str, starts: Mapping[int, int]) -> FakeReader:
        asked.append(dict(starts))
        rows = [
            Record(p, o, 0, b"k", v, ())
            for p, start in sorted(starts.items())
            for o, v in enumerate(log[p])
            if o >= max(0, start)
        ]
        made.append(FakeReader(rows))
        return made[-1]

    ahead = ReadAhead(
        "t",
        readers,
        EventDecoder(SCHEMA),
        ListNamer("{audience_name}", {}),
        None,
        max_keys,
        max_seconds,
        Clock(),
    )
    return ahead, asked, made


def until_done(ahead: ReadAhead) -> dict[int, Backlog]:
    for _ in range(1000):
        found = ahead.step(0.002)
        if found is not None:
            return found
    raise AssertionError("the read-ahead never finished")


def test_the_stage_reads_from_the_committed_offset_and_indexes_what_it_can_decode() -> None:
    log: dict[int, list[bytes | None]] = {
        0: [
            value("a@x.com", "L", "ENTERED"),  # before the committed offset: not read
            value("a@x.com", "L", "ENTERED"),
            b"\x00garbage",
            value("a@x.com", "L", "EXITED", 5),
            None,
        ]
    }
    ahead, asked, made = stage(log)
    ahead.start({0: 1})
    assert ahead.reading == {0}
    backlogs = until_done(ahead)
    assert asked == [{0: 1}] and made[0].closed
    backlog = backlogs[0]
    assert backlog.sealed  # the keys go before the records flow
    assert backlog.records == 4 and backlog.end == 5 and backlog.keys == 1
    assert backlog.superseded(1)
    assert not backlog.superseded(3)
    assert ahead.reading == frozenset()


def test_nothing_committed_is_read_from_the_beginning() -> None:
    ahead, asked, _ = stage({3: [value("a@x.com", "L", "ENTERED")]})
    ahead.start({3: -1})
    until_done(ahead)
    assert asked == [{3: -2}]


def test_the_stage_stops_at_its_key_bound_with_the_prefix_indexed() -> None:
    rows: list[bytes | None] = [value(f"p{i}@x.com", "L", "ENTERED") for i in range(10)]
    rows.append(value("p0@x.com", "L", "EXITED"))
    ahead, _, made = stage({0: rows}, max_keys=4)
    ahead.start({0: 0})
    backlog = until_done(ahead)[0]
    assert 4 <= backlog.keys < 10 and made[0].closed
    # The exit of p0 (offset 10) was never read: the entry is not superseded.
    assert backlog.end < 10
    assert not backlog.superseded(0)


def test_the_stage_stops_at_its_time_bound() -> None:
    rows: list[bytes | None] = [value(f"p{i}@x.com", "L", "ENTERED") for i in range(50)]
    ahead, _, _ = stage({0: rows}, max_seconds=0.01)
    ahead.start({0: 0})
    backlog = until_done(ahead)[0]
    assert backlog.end < 50


def test_a_new_assignment_restarts_the_read_with_the_union() -> None:
    log: dict[int, list[bytes | None]] = {
        0: [value(f"p{i}@x.com", "L", "ENTERED") for i in range(20)],
        1: [value("q@x.com", "L", "ENTERED")],
    }
    ahead, asked, made = stage(log)
    ahead.start({0: 0})
    assert ahead.step(0.0005) is None  # one slice, not done
    ahead.start({1: 0})
    assert made[0].closed
    assert asked[-1] == {0: 0, 1: 0}
    backlogs = until_done(ahead)
    assert set(backlogs) == {0, 1} and backlogs[0].keys == 20


def test_cancel_of_some_partitions_restarts_the_others() -> None:
    log: dict[int, list[bytes | None]] = {
        0: [value("p@x.com", "L", "ENTERED")] * 5,
        1: [value("q@x.com", "L", "ENTERED")] * 5,
    }
    ahead, asked, _ = stage(log)
    ahead.start({0: 0, 1: 2})
    ahead.cancel({0})
    assert asked[-1] == {1: 2} and ahead.reading == {1}
    ahead.cancel()
    assert ahead.reading == frozenset() and ahead.step(1.0) is None


def test_a_reader_that_fails_ends_the_read_with_what_was_indexed() -> None:
    ahead, _, made = stage({0: [value("p@x.com", "L", "ENTERED")] * 4})
    ahead.start({0: 0})

    def broken(max_records: int, timeout: float) -> list[Record]:
        raise LookupError("topic t does not exist")

    made[0].read = broken  # type: ignore[method-assign]
    backlog = until_done(ahead)[0]
    assert backlog.keys == 0 and made[0].closed


# ---- what the read-ahead's drain relies on -------------------------------------------------


def test_an_import_poll_waits_in_the_urgent_lane_with_the_imports() -> None:
    """Behind a burst of imports (urgent), a normal poll waited for the whole burst: the
    500,000-event drain's last 80 polls came 20 s after its last import."""
    from service.core import acapi

    call = acapi.import_info("7")
    first = next(call)
    assert first.endpoint == "/import/info" and first.priority == acapi.URGENT


def test_the_guard_compares_the_exact_event_time_it_packed() -> None:
    """Odd times, no tolerance: a record one millisecond older than the kept one is stale."""
    backlog = Backlog(0)
    backlog.add(("x", A), 0, 1001)
    backlog.add(("x", A), 1, 1000)
    backlog.read(1)
    assert not backlog.superseded(0)


def test_the_lists_a_backlog_names_are_told_once_each_while_it_is_read() -> None:
    log: dict[int, list[bytes | None]] = {
        0: [value("a@x.com", "L", "ENTERED"), value("b@x.com", "L", "ENTERED")],
        1: [value("c@x.com", "M", "ENTERED"), b"\x00garbage", value("a@x.com", "L", "EXITED")],
        2: [value("d@x.com", "M", "ENTERED")],
    }
    ahead, _, _ = stage(log)
    seen: list[ListRef] = []
    ahead.list_seen = seen.append
    ahead.start({0: 0, 1: 0})
    assert ahead.step(0.0) is None  # one read (two records): its list is told before the end
    assert seen == [ListRef("L")]
    until_done(ahead)
    assert seen == [ListRef("L"), ListRef("M")]
    ahead.start({2: 0})  # a later assignment naming a list already told tells nothing again
    until_done(ahead)
    assert seen == [ListRef("L"), ListRef("M")]


def test_a_record_whose_email_has_a_later_record_processed_is_marked_continues() -> None:
    backlog = Backlog(None)
    keys = [("x", A), ("y", A), ("x", B), ("x", B), ("y", B), ("z", A)]
    for offset, key in enumerate(keys):
        backlog.read(offset)
        backlog.add(key, offset, 1000 + offset)
    assert [backlog.mark(o) for o in range(7)] == [
        CONTINUES,  # x's last record processed is offset 3
        CONTINUES,  # y's is offset 4
        SUPERSEDED,  # offset 3 supersedes it
        0,  # x's last
        0,  # y's last
        0,  # z has one record
        0,  # never read ahead
    ]


def test_a_record_the_guard_keeps_after_the_one_kept_is_its_emails_last() -> None:
    backlog = Backlog(60_000)
    backlog.add(("x", A), 0, 1_000_000)
    backlog.add(("x", B), 1, 1_000_000)
    backlog.add(("x", B), 2, 1_000_000 - 60_001)  # stale: processed as usual
    backlog.add(("x", B), 3, 1_000_000 - 60_002)  # stale too, and the email's last
    backlog.add(("y", A), 4, 0)
    assert [backlog.mark(o) for o in range(5)] == [CONTINUES, CONTINUES, CONTINUES, 0, 0]
    # A later record kept for another list of the email: the stale ones continue to it.
    backlog = Backlog(60_000)
    backlog.add(("x", B), 0, 1_000_000)
    backlog.add(("x", B), 1, 1_000_000 - 60_001)  # stale: processed as usual
    backlog.add(("x", A), 2, 1_000_000)  # the email's last
    assert [backlog.mark(o) for o in range(3)] == [CONTINUES, CONTINUES, 0]


@given(st.lists(st.tuples(st.sampled_from("xyz"), st.sampled_from([A, B])), max_size=30))
def test_continues_exactly_where_a_later_record_of_the_email_is_not_superseded(
    keys: list[tuple[str, ListRef]],
) -> None:
    backlog = Backlog(None)
    for offset, key in enumerate(keys):
        backlog.read(offset)
        backlog.add(key, offset, offset)
    processed = [o for o in range(len(keys)) if not backlog.superseded(o)]
    for offset, (email, _) in enumerate(keys):
        later = any(o > offset and keys[o][0] == email for o in processed)
        expected = SUPERSEDED if offset not in processed else CONTINUES if later else 0
        assert backlog.mark(offset) == expected

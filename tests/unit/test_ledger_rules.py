"""The ledger's rules one by one (``service/core/ledger.py``): write-ahead bits, a state read
back after a crash (``rechecked``, ``plan_known``), replays at their edges, merging records,
the stored hash and the compact form's edge values."""

from __future__ import annotations

import io

import fastavro
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from service.core.ledger import (
    OPTED_OUT,
    PENDING_IMPORT,
    Known,
    LedgerEntry,
    ListState,
    Plan,
    SetBy,
    fields_hash,
    merged,
    newest,
    pending_bit,
    plan_change,
    plan_known,
    rechecked,
    with_pending,
)
from service.core.ledger_codec import LEDGER_V1_SCHEMA_FILE, LedgerCodec, load_ledger_schema
from service.core.ledger_index import CompactIndex
from service.core.model import Action

E, X = Action.ENTERED, Action.EXITED


def state(
    status: int = 1,
    set_by: SetBy = SetBy.SERVICE,
    *,
    label: str = "VIP",
    offset: int = 10,
    at: int = 1000,
    applied: int = 1005,
    verified: bool = True,
    pending: int = 0,
    since_ms: int = 0,
    list_id: str | None = None,
) -> ListState:
    return ListState(
        label, status, set_by, "ev-1", at, applied, 0, offset, "aud", "VIP", None, None,
        verified, list_id, pending, since_ms,
    )  # fmt: skip


# ---- write-ahead bits -----------------------------------------------------------------------


def test_each_status_has_its_pending_bit() -> None:
    assert (pending_bit(1), pending_bit(2)) == (1, 2)


@pytest.mark.parametrize(
    ("pending", "status", "via_import", "expected"),
    [
        (0, 1, False, 1),
        (0, 2, False, 2),
        (0, 1, True, 11),
        (1, 2, False, 3),  # a new write never erases an unresolved one
        (2, 2, False, 2),
        (11, 2, False, 13),  # an import's uncertainty stays
        (10, 1, False, 11),
        (3, 1, True, 13),
    ],
)
def test_with_pending_adds_to_what_is_unresolved(
    pending: int, status: int, via_import: bool, expected: int
) -> None:
    assert with_pending(pending, status, via_import=via_import) == expected


def test_pending_statuses_and_import_read_the_bits() -> None:
    assert state(pending=0).pending_statuses == frozenset()
    assert state(pending=1).pending_statuses == {1}
    assert state(pending=2).pending_statuses == {2}
    assert state(pending=13).pending_statuses == {1, 2}
    assert not state(pending=3).pending_import
    assert state(pending=PENDING_IMPORT).pending_import and state(pending=12).pending_import


def test_a_write_ahead_taken_back_is_no_state_but_an_announced_one_is() -> None:
    taken_back = state(status=0, pending=0)
    announced = state(status=0, pending=1)
    assert LedgerEntry(None, 0, (taken_back,)).state("VIP") is None
    assert LedgerEntry(None, 0, (announced,)).state("VIP") == announced
    assert LedgerEntry(None, 0, (state(list_id="7"),)).state("VIP", "7") == state(list_id="7")
    assert LedgerEntry(None, 0, (state(list_id="7"),)).state("VIP", "8") is None
    assert LedgerEntry(None, 0, (state(),)).state("VIP", "8") == state()  # version 1: no id
    assert LedgerEntry(None, 0, (state(),)).state("Other") is None


def test_an_entry_without_states_has_no_newest_offset() -> None:
    assert LedgerEntry(None, 0, ()).newest_offset() == -1
    two = LedgerEntry(None, 0, (state(offset=4), state(label="B", offset=9)))
    assert two.newest_offset() == 9


# ---- replays at their edges ------------------------------------------------------------------


def test_the_very_record_the_ledger_holds_is_a_replay() -> None:
    ours = state(status=2, set_by=SetBy.SERVICE, offset=10, at=1000)
    assert plan_change(ours, E, 0, 10, 1000) is Plan.SKIP
    assert plan_change(ours, E, 0, 11, 1000) is Plan.RESUBSCRIBE  # a later record
    assert plan_change(ours, E, 0, 10, 1001) is Plan.RESUBSCRIBE  # a later event
    assert plan_change(ours, E, 1, 10, 1000) is Plan.RESUBSCRIBE  # another partition


def test_a_change_just_the_tolerance_older_than_the_applied_event_is_not_stale() -> None:
    """The staleness guard's edge: older by exactly the tolerance, offset order still decides;
    a millisecond more and the change is stale."""
    ours = state(status=2, set_by=SetBy.SERVICE, offset=10, at=100_000)
    assert plan_change(ours, E, 1, 5, 40_000, 60_000) is Plan.RESUBSCRIBE
    assert plan_change(ours, E, 1, 5, 39_999, 60_000) is Plan.STALE
    assert plan_change(ours, E, 1, 5, 100_000, 0) is Plan.RESUBSCRIBE  # no tolerance: same time


def test_an_uncertain_state_is_always_read_again() -> None:
    assert plan_change(state(pending=1), X, 0, 99, 9999) is Plan.RECHECK
    assert plan_change(state(status=0, pending=2), E, 0, 1, 1) is Plan.RECHECK


# ---- a state read back from AC after a crash -----------------------------------------------

SINCE_MS = 100_000  # the write-ahead was announced at 100 s (wall clock)


@pytest.mark.parametrize(
    ("recorded", "ac_status", "unsubscribed_at", "expected"),
    [
        # AC holds what we were setting: our write landed
        (state(1, pending=2, since_ms=SINCE_MS), 2, 150.0, Known(2, SetBy.SERVICE, True)),
        (state(2, pending=1, since_ms=SINCE_MS), 1, None, Known(1, SetBy.SERVICE, True)),
        # AC holds what we had recorded: it did not land
        (state(1, SetBy.SERVICE, verified=False, pending=2), 1, None,
         Known(1, SetBy.SERVICE, False)),
        (state(2, SetBy.PERSON, pending=1), 2, None, Known(2, SetBy.PERSON, True)),
        # not a member: nothing of ours there
        (state(1, pending=2), None, None, None),
        # a 2 AC dates clearly before our write-ahead (or does not date): the person's
        (state(1, pending=2, since_ms=SINCE_MS), 2, None, OPTED_OUT),
        (state(1, pending=2, since_ms=SINCE_MS), 2, 98.0, OPTED_OUT),  # 2 s margin: exactly
        (state(1, pending=2, since_ms=SINCE_MS), 2, 98.001, Known(2, SetBy.SERVICE, True)),
        # someone else changed it: a 1 we take as ours, another 2 as unknown
        (state(2, SetBy.PERSON, pending=2), 1, None, Known(1, SetBy.SERVICE, True)),
        (state(1, pending=1, since_ms=SINCE_MS), 2, 150.0, Known(2, SetBy.UNKNOWN, True)),
    ],
)  # fmt: skip
def test_rechecked(
    recorded: ListState, ac_status: int | None, unsubscribed_at: float | None, expected: Known
) -> None:
    assert rechecked(recorded, ac_status, unsubscribed_at) == expected


def test_rechecked_dates_the_write_ahead_in_seconds() -> None:
    recorded = state(1, pending=2, since_ms=2_000_000)  # 2000 s
    assert rechecked(recorded, 2, 1997.9) == OPTED_OUT
    assert rechecked(recorded, 2, 1998.5) == Known(2, SetBy.SERVICE, True)


@pytest.mark.parametrize(
    ("known", "action", "plan"),
    [
        (None, E, Plan.FIRST_ENTRY),
        (None, X, Plan.SKIP),
        (Known(1, SetBy.SERVICE, False), E, Plan.SKIP),
        (Known(2, SetBy.SERVICE, True), E, Plan.RESUBSCRIBE),
        (Known(2, SetBy.SERVICE, False), E, Plan.FIRST_ENTRY),
        (Known(2, SetBy.PERSON, True), E, Plan.CONSENT_KEPT),
        (Known(2, SetBy.UNKNOWN, True), E, Plan.FIRST_ENTRY),
        (Known(2, SetBy.PERSON, True), X, Plan.SKIP),
        (Known(1, SetBy.SERVICE, True), X, Plan.UNSUBSCRIBE),  # AC said 1 a moment ago
        (Known(1, SetBy.UNKNOWN, True), X, Plan.UNSUBSCRIBE),
    ],
)
def test_plan_known(known: Known | None, action: Action, plan: Plan) -> None:
    assert plan_known(known, action) is plan


# ---- merging records ---------------------------------------------------------------------


def test_merged_into_nothing_starts_an_entry() -> None:
    s = state()
    assert merged(None, [s], None, None) == LedgerEntry(None, 0, (s,))
    assert merged(None, [s], "5", 77) == LedgerEntry("5", 77, (s,))


def test_merged_keeps_what_it_is_not_told() -> None:
    old = LedgerEntry("5", 77, (state(),))
    assert merged(old, [], None, None) == old
    assert merged(old, [], "6", 0) == LedgerEntry("6", 0, old.lists)


def test_newest_breaks_a_tie_by_log_order() -> None:
    a = state(offset=10, applied=1005, at=1)
    b = state(offset=10, applied=1005, at=2)  # same record, written again later
    result = newest(LedgerEntry("1", 5, (a,)), LedgerEntry("2", 6, (b,)))
    assert result == LedgerEntry("2", 6, (b,))


def test_newest_takes_contact_and_fields_from_the_newer_record_or_keeps_the_older_ones() -> None:
    older = LedgerEntry("1", 5, (state(offset=20),))
    newer = LedgerEntry(None, 0, (state(offset=30),))
    assert newest(older, newer) == LedgerEntry("1", 5, newer.lists)
    late = LedgerEntry("2", 6, (state(offset=3),))  # written after, about an older record
    assert newest(older, late) == LedgerEntry("1", 5, older.lists)


def test_a_first_record_is_the_entry() -> None:
    entry = LedgerEntry("1", 5, (state(),))
    assert newest(None, entry) is entry


# ---- the stored hash -----------------------------------------------------------------------


def test_fields_hash_is_a_stored_constant_of_63_bits() -> None:
    """Ledger records keep it: a new hash for the same fields would resend every contact."""
    assert fields_hash({"firstName": "Ann"}, {}) == 5181500552681456615
    assert fields_hash({}, {"12": "gold"}) == 8399861322964742385
    assert fields_hash({}, {}) == 0


@given(
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3),
)
def test_fields_hash_is_zero_exactly_without_fields(
    standard: dict[str, str], custom: dict[str, str]
) -> None:
    value = fields_hash(standard, custom)
    assert 0 <= value < 2**63
    assert (value == 0) == (not standard and not custom)


# ---- the compact form's edges --------------------------------------------------------------


def test_any_contact_id_packs_and_only_a_64_bit_number_is_kept() -> None:
    index = CompactIndex()
    for cid, kept in [
        ("18446744073709551615", "18446744073709551615"),  # 2**64 - 1
        ("18446744073709551616", None),  # 2**64: does not fit, dropped rather than failing
        ("9" * 30, None),
        ("abc", None),
        (None, None),
    ]:
        entry = LedgerEntry(cid, 1, (state(),))
        assert index.unpack(index.pack(entry)).contact_id == kept, cid


def test_labels_and_contexts_are_interned_once_for_every_entry() -> None:
    index = CompactIndex()
    for p in range(3):
        index.put(p, f"e{p}@x.co", LedgerEntry("1", 0, (state(), state(label="B"))))
    assert len(index._labels) == 2 and len(index._contexts) == 1
    assert index.get(2, "e2@x.co") == LedgerEntry("1", 0, (state(), state(label="B")))


def test_a_partition_is_replaced_or_forgotten_whole() -> None:
    index = CompactIndex()
    index.put(0, "a@x.co", LedgerEntry("1", 0, (state(),)))
    packed = index.partitions[0]["a@x.co"]
    index.replace(1, {"b@x.co": packed})
    assert index.get(1, "b@x.co") == LedgerEntry("1", 0, (state(),))
    assert len(index) == 2
    index.forget({0, 5})
    assert index.get(0, "a@x.co") is None and len(index) == 1
    assert index.get(7, "a@x.co") is None


# ---- the Avro record's edges ------------------------------------------------------------------

V1_LIST = {
    "list": "VIP", "status": 2, "set_by": "SERVICE", "event_id": "e", "event_time": 1,
    "applied_at": 2, "source_partition": 0, "source_offset": 3, "audience_id": "a",
    "audience_name": "VIP", "campaign_id": None, "treatment_group": None,
}  # fmt: skip


def test_a_version_1_record_has_no_pending_write_and_no_list_id() -> None:
    out = io.BytesIO()
    record = {"contact_id": "5", "fields_hash": 9, "lists": [V1_LIST]}
    fastavro.schemaless_writer(out, load_ledger_schema(LEDGER_V1_SCHEMA_FILE), record)
    [s] = LedgerCodec().decode(out.getvalue()).lists
    assert (s.verified, s.list_id, s.pending, s.pending_since_ms) == (False, None, 0, 0)


def test_a_value_that_is_no_ledger_record_says_why() -> None:
    codec = LedgerCodec()
    with pytest.raises(ValueError, match=r"^not a ledger record: (?!NoneType)\w+$"):
        codec.decode(b"\xff\x02garbage")
    good = codec.encode(LedgerEntry("1", 0, (state(),)))
    with pytest.raises(ValueError, match=r"^not a ledger record: trailing bytes$"):
        codec.decode(good + b"\x00")


PENDING_VALUES = {bits + via for bits in range(4) for via in (0, PENDING_IMPORT)}


@given(status=st.integers(-2, 5), pending=st.integers(-2, 15))
@example(status=0, pending=0)
@example(status=3, pending=0)
@example(status=1, pending=4)
def test_a_record_with_a_status_or_pending_value_the_index_cannot_pack_is_refused(
    status: int, pending: int
) -> None:
    """The compact index packs a status (0, 1, 2) and a write-ahead (its bits, plus
    PENDING_IMPORT when by import) in a byte each: a record holding any other value is refused
    as no ledger record of ours, naming the value; any other record reads back as written."""
    codec = LedgerCodec()
    entry = LedgerEntry("1", 0, (state(), state(status=status, label="B", pending=pending)))
    data = codec.encode(entry)
    if status not in (0, 1, 2):
        with pytest.raises(
            ValueError, match=rf"^not a ledger record: status {status} out of range$"
        ):
            codec.decode(data)
    elif pending not in PENDING_VALUES:
        with pytest.raises(
            ValueError, match=rf"^not a ledger record: pending {pending} out of range$"
        ):
            codec.decode(data)
    else:
        assert codec.decode(data) == entry


def test_an_event_id_is_kept_exactly_even_when_it_reads_as_a_uuid() -> None:
    index = CompactIndex()
    for event_id in [
        "0f8fad5b-d9cb-469f-a165-70867728950e",  # canonical: packed in 16 bytes
        "0F8FAD5B-D9CB-469F-A165-70867728950E",  # a UUID, but not as str(uuid) writes it
        "{0f8fad5b-d9cb-469f-a165-70867728950}",  # 36 characters, not a UUID
    ]:
        entry = LedgerEntry(None, 0, (state()._replace(event_id=event_id),))
        assert index.unpack(index.pack(entry)).lists[0].event_id == event_id

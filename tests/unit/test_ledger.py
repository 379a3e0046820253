"""The ledger's pure core: the decision table, the record codec and the compact in-memory form."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.app.audit import differences, explain_json, explain_lines
from service.core.ledger import (
    CompactIndex,
    LedgerCodec,
    LedgerEntry,
    ListState,
    Plan,
    SetBy,
    fields_hash,
    merged,
    plan_change,
    set_by_after,
)
from service.core.model import Action

E, X = Action.ENTERED, Action.EXITED


def state(
    status: int, set_by: SetBy = SetBy.SERVICE, offset: int = 10, at: int = 1000
) -> ListState:
    return ListState("VIP", status, set_by, "ev-1", at, at + 5, 0, offset, "aud", "VIP")


@pytest.mark.parametrize(
    ("recorded", "action", "plan"),
    [
        (None, E, Plan.FIRST_ENTRY),  # no record of ours: never override an opt-out
        (None, X, Plan.SKIP),  # nothing of ours to undo
        (state(1), E, Plan.SKIP),
        (state(1), X, Plan.SET),
        (state(2, SetBy.SERVICE), E, Plan.RESUBSCRIBE),  # our own unsubscribe: reversible
        (state(2, SetBy.SERVICE), X, Plan.SKIP),
        (state(2, SetBy.PERSON), E, Plan.CONSENT_KEPT),
        (state(2, SetBy.PERSON), X, Plan.SKIP),
        (state(2, SetBy.UNKNOWN), E, Plan.FIRST_ENTRY),
    ],
)
def test_decision_table(recorded: ListState | None, action: Action, plan: Plan) -> None:
    assert plan_change(recorded, action, 0, 50, 2000) is plan


def test_a_replay_of_older_records_is_skipped_whatever_its_action() -> None:
    recorded = state(2, SetBy.SERVICE, offset=10, at=1000)
    assert plan_change(recorded, E, 0, 7, 900) is Plan.SKIP  # older offset and older time
    # newer by time but older by offset, or another partition: not provably a replay
    assert plan_change(recorded, E, 0, 7, 1100) is Plan.RESUBSCRIBE
    assert plan_change(recorded, E, 1, 7, 900) is Plan.RESUBSCRIBE
    assert plan_change(recorded, E, 0, 11, 900) is Plan.RESUBSCRIBE  # a later record


def test_who_owns_the_recorded_status() -> None:
    assert set_by_after(Plan.FIRST_ENTRY, E, None, consent_kept=True) is SetBy.PERSON
    assert set_by_after(Plan.FIRST_ENTRY, E, None, consent_kept=False) is SetBy.SERVICE
    assert set_by_after(Plan.SET, X, state(1), consent_kept=False) is SetBy.SERVICE
    assert set_by_after(Plan.SET, X, state(2, SetBy.PERSON), consent_kept=False) is SetBy.PERSON
    assert set_by_after(Plan.SET, X, None, consent_kept=False) is SetBy.UNKNOWN


def test_merged_replaces_only_the_lists_it_names() -> None:
    other = state(1)._replace(list="Other")
    entry = LedgerEntry("7", 99, (state(1), other))
    new = merged(entry, [state(2)], None, None)
    assert new.contact_id == "7" and new.fields_hash == 99
    assert new.state("VIP") == state(2) and new.state("Other") == other
    assert merged(None, [state(1)], "3", 5) == LedgerEntry("3", 5, (state(1),))


def test_fields_hash_is_stable_and_zero_only_without_fields() -> None:
    assert fields_hash({}, {}) == 0
    a = fields_hash({"firstName": "Pat"}, {"3": "x"})
    assert a == fields_hash({"firstName": "Pat"}, {"3": "x"}) != 0
    assert a != fields_hash({"firstName": "Pam"}, {"3": "x"})
    assert 0 < a < 2**63


text = st.text(min_size=0, max_size=30)
list_states = st.builds(
    ListState,
    list=st.text(min_size=1, max_size=20),
    status=st.sampled_from([1, 2]),
    set_by=st.sampled_from(list(SetBy)),
    event_id=st.one_of(st.uuids().map(str), text),
    event_time_ms=st.integers(0, 2**62),
    applied_at_ms=st.integers(0, 2**62),
    source_partition=st.integers(0, 10_000),
    source_offset=st.integers(0, 2**62),
    audience_id=text,
    audience_name=text,
    campaign_id=st.none() | text,
    treatment_group=st.none() | text,
)
entries = st.builds(
    LedgerEntry,
    contact_id=st.none() | st.integers(1, 2**40).map(str),
    fields_hash=st.integers(0, 2**63 - 1),
    lists=st.lists(list_states, max_size=4, unique_by=lambda s: s.list).map(tuple),
)


@given(entries)
def test_the_avro_record_round_trips(entry: LedgerEntry) -> None:
    codec = LedgerCodec()
    assert codec.decode(codec.encode(entry)) == entry


@given(entries)
def test_the_compact_form_round_trips(entry: LedgerEntry) -> None:
    index = CompactIndex()
    index.put(3, "a@example.com", entry)
    assert index.get(3, "a@example.com") == entry
    assert index.get(4, "a@example.com") is None


def test_the_compact_form_is_small_and_forgets_partitions() -> None:
    index = CompactIndex()
    entry = LedgerEntry(
        "123456",
        0,
        (ListState("VIP", 1, SetBy.SERVICE, str(uuid.uuid4()), 1, 2, 0, 3, "a", "VIP"),),
    )
    packed = index.pack(entry)
    assert len(packed) < 80  # a UUID in 16 bytes, the context interned
    index.put(0, "a@example.com", entry)
    index.put(1, "b@example.com", entry)
    assert len(index) == 2
    index.forget({0})
    assert len(index) == 1 and index.get(0, "a@example.com") is None
    # a non-numeric contact id is dropped (costs a contact/sync later), never garbled
    odd = entry._replace(contact_id="abc")
    assert index.unpack(index.pack(odd)).contact_id is None


def test_explain_says_who_set_each_status() -> None:
    entry = LedgerEntry(
        "9",
        0,
        (
            state(2, SetBy.PERSON)._replace(campaign_id="spring", treatment_group="B"),
            state(2, SetBy.SERVICE)._replace(list="Old"),
        ),
    )
    data = explain_json("a@example.com", entry, None)
    assert [(i["list"], i["consent_kept"], i["set_by"]) for i in data["lists"]] == [
        ("Old", False, "service"),
        ("VIP", True, "person"),
    ]
    assert data["lists"][1]["event"]["campaign_id"] == "spring"
    text = "\n".join(explain_lines("a@example.com", entry, "VIP"))
    assert "consent kept" in text and "treatment group B" in text and "Old" not in text
    assert "no ledger entry" in explain_lines("b@example.com", None, None)[0]


def test_reconcile_differences_name_what_changed_behind_our_back() -> None:
    entries = {
        "same@x.io": LedgerEntry(None, 0, (state(1),)),
        "self@x.io": LedgerEntry(None, 0, (state(1),)),
        "gone@x.io": LedgerEntry(None, 0, (state(1),)),
        "ours@x.io": LedgerEntry(None, 0, (state(2),)),
        "back@x.io": LedgerEntry(None, 0, (state(2),)),
    }
    ac = {"same@x.io": 1, "self@x.io": 2, "ours@x.io": 2, "back@x.io": 1, "hand@x.io": 1}
    found = {d.email: (d.ledger, d.ac) for d in differences("VIP", entries, ac)}
    assert found == {
        "self@x.io": ("subscribed", "unsubscribed"),
        "gone@x.io": ("subscribed", "absent"),
        "back@x.io": ("unsubscribed", "subscribed"),
        "hand@x.io": ("none", "subscribed"),
    }


def test_import_budget_records_round_trip_and_reject_anything_else() -> None:
    from service.adapters.ledger_store import decode_budget, encode_budget

    charges = [(1000.125, 0.25), (1060.5, 1.0)]
    assert decode_budget(encode_budget(charges)) == charges
    for raw in (b"", b"{}", b'{"imports": [[1, -1]]}', b'{"imports": [["x", 1]]}', b"\x00\x01"):
        with pytest.raises(ValueError, match="import-budget"):
            decode_budget(raw)

"""The ledger's pure core: the decision table, the record codec and the compact in-memory form."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.app.audit import differences, explain_json, explain_lines
from service.core.ledger import (
    LedgerEntry,
    ListState,
    Plan,
    SetBy,
    fields_hash,
    merged,
    newest,
    plan_change,
)
from service.core.ledger_codec import LedgerCodec
from service.core.ledger_index import CompactIndex
from service.core.model import Action

E, X = Action.ENTERED, Action.EXITED


def state(
    status: int,
    set_by: SetBy = SetBy.SERVICE,
    offset: int = 10,
    at: int = 1000,
    verified: bool = True,
) -> ListState:
    return ListState(
        "VIP", status, set_by, "ev-1", at, at + 5, 0, offset, "aud", "VIP", None, None, verified
    )


@pytest.mark.parametrize(
    ("recorded", "action", "plan"),
    [
        (None, E, Plan.FIRST_ENTRY),  # no record of ours: never override an opt-out
        (None, X, Plan.SKIP),  # nothing of ours to undo
        (state(1), E, Plan.SKIP),
        (state(1), X, Plan.EXIT),  # verified first: the person may have opted out since
        (state(1, verified=False), X, Plan.EXIT),
        (state(2, SetBy.SERVICE), E, Plan.RESUBSCRIBE),  # our own unsubscribe: reversible
        # not known to be ours (a version-1 record, or an exit not checked): never override
        (state(2, SetBy.SERVICE, verified=False), E, Plan.FIRST_ENTRY),
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


def test_merged_replaces_only_the_lists_it_names() -> None:
    other = state(1)._replace(list="Other")
    entry = LedgerEntry("7", 99, (state(1), other))
    new = merged(entry, [state(2)], None, None)
    assert new.contact_id == "7" and new.fields_hash == 99
    assert new.state("VIP") == state(2) and new.state("Other") == other
    assert merged(None, [state(1)], "3", 5) == LedgerEntry("3", 5, (state(1),))


def test_a_state_of_a_deleted_list_is_no_state() -> None:
    entry = LedgerEntry("7", 0, (state(1)._replace(list_id="5"),))
    assert entry.state("VIP", "5") is not None
    assert entry.state("VIP", "6") is None  # the list was deleted and created again
    assert LedgerEntry("7", 0, (state(1),)).state("VIP", "6") is not None  # no id recorded


def test_newest_keeps_the_latest_source_record_of_each_list_whatever_the_log_order() -> None:
    older = LedgerEntry("7", 1, (state(1, offset=10), state(1, offset=3)._replace(list="B")))
    newer = LedgerEntry(None, 2, (state(2, offset=20),))
    for merged_entry in (newest(older, newer), newest(newer, older)):
        assert merged_entry.state("VIP") == state(2, offset=20)
        assert merged_entry.state("B") is not None
        assert merged_entry.contact_id == "7"
    assert newest(older, newer).fields_hash == 2 == newest(newer, older).fields_hash


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
    verified=st.booleans(),
    list_id=st.none() | st.integers(1, 10**9).map(str),
    pending=st.sampled_from([0, 1, 2, 3, 11, 12, 13]),
    pending_since_ms=st.integers(0, 2**62),
).map(lambda s: s if s.pending else s._replace(pending_since_ms=0))  # no time without a pending
entries = st.builds(
    LedgerEntry,
    contact_id=st.none() | st.integers(1, 2**40).map(str),
    fields_hash=st.integers(0, 2**63 - 1),
    lists=st.lists(list_states, max_size=4, unique_by=lambda s: s.list).map(tuple),
)


def test_any_valid_entry_packs_however_many_lists_and_however_long_its_ids() -> None:
    """The packed index once capped lists per email at 255 and event ids under 64 KiB: a write
    past either raised on the main loop, and the replica crashed on the same record for ever."""
    lists = tuple(state(1)._replace(list=f"L{i}", event_id="x" * 70_000) for i in range(300))
    entry = LedgerEntry("1", 0, lists)
    index = CompactIndex()
    index.put(0, "a@example.com", entry)
    assert index.get(0, "a@example.com") == entry
    codec = LedgerCodec()
    assert codec.decode(codec.encode(entry)) == entry


def test_version_1_records_are_read_as_unverified() -> None:
    import io

    import fastavro

    from service.core.ledger_codec import LEDGER_V1_SCHEMA_FILE, load_ledger_schema

    old = {
        "contact_id": "5",
        "fields_hash": 0,
        "lists": [
            {
                "list": "VIP",
                "status": 2,
                "set_by": "SERVICE",
                "event_id": "e",
                "event_time": 1,
                "applied_at": 2,
                "source_partition": 0,
                "source_offset": 3,
                "audience_id": "a",
                "audience_name": "VIP",
                "campaign_id": None,
                "treatment_group": None,
            }
        ],
    }
    out = io.BytesIO()
    fastavro.schemaless_writer(out, load_ledger_schema(LEDGER_V1_SCHEMA_FILE), old)
    entry = LedgerCodec().decode(out.getvalue())
    assert entry.state("VIP") is not None and entry.state("VIP").verified is False  # type: ignore[union-attr]
    # a version-1 exit of ours is not trusted to be ours: a re-entry never overrides it
    assert plan_change(entry.state("VIP"), E, 0, 50, 2000) is Plan.FIRST_ENTRY
    with pytest.raises(ValueError, match="not a ledger record"):
        LedgerCodec().decode(b"\xff\x02garbage")


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

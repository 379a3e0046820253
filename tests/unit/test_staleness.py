"""The staleness guard (issue 17): a change that occurred more than the tolerance before the event
the ledger applied (or the pending event it would replace) sends nothing; within the tolerance,
offset order decides as before."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.app.audit import explain_json, explain_lines
from service.app.settings_loader import load_settings
from service.core.coalesce import Coalescer, ListRef
from service.core.errors import ConfigError
from service.core.ledger import LedgerEntry, ListState, Plan, SetBy, plan_change
from service.core.model import Action, MembershipEvent
from service.pipeline.plan import Route, plan_group
from tests.unit.test_settings import env

A = ListRef(name="VIP")
T0 = 1_700_000_000_000


def recorded(
    status: int,
    set_by: SetBy,
    verified: bool,
    partition: int,
    offset: int,
    at: int,
    pending: int = 0,
) -> ListState:
    return ListState(
        "VIP",
        status,
        set_by,
        "ev-1",
        at,
        at + 5,
        partition,
        offset,
        "aud",
        "VIP",
        None,
        None,
        verified,
        "3",
        pending,
    )


states = st.builds(
    recorded,
    status=st.sampled_from([1, 2]),
    set_by=st.sampled_from(list(SetBy)),
    verified=st.booleans(),
    partition=st.integers(0, 2),
    offset=st.integers(0, 100),
    at=st.integers(T0, T0 + 10_000_000),
    pending=st.sampled_from([0, 0, 0, 1, 2]),
)


@given(
    state=states | st.none(),
    action=st.sampled_from(list(Action)),
    partition=st.integers(0, 2),
    offset=st.integers(0, 100),
    at=st.integers(T0 - 10_000_000, T0 + 20_000_000),
    tolerance=st.integers(0, 3_600_000),
)
def test_the_guard_only_adds_stale_to_the_decision_table(
    state: ListState | None, action: Action, partition: int, offset: int, at: int, tolerance: int
) -> None:
    """With the guard on, every decision is the table's own, except that a change older than
    the applied event by more than the tolerance is STALE. An uncertain state is read first and
    a replay is a replay, whatever their age."""
    guarded = plan_change(state, action, partition, offset, at, tolerance)
    table = plan_change(state, action, partition, offset, at)
    if state is not None and table not in (Plan.RECHECK, Plan.SKIP):
        older = at + tolerance < state.event_time_ms
        assert guarded is (Plan.STALE if older else table)
    elif state is not None and table is Plan.SKIP:
        assert guarded in (Plan.SKIP, Plan.STALE)
    else:
        assert guarded is table
    if guarded is Plan.STALE:
        assert state is not None and at + tolerance < state.event_time_ms


def test_an_old_entry_cannot_undo_a_newer_exit_from_another_producer() -> None:
    exited = recorded(2, SetBy.SERVICE, True, partition=1, offset=5, at=T0 + 600_000)
    # An ENTERED from ten minutes before, published later (another partition, a later offset).
    assert plan_change(exited, Action.ENTERED, 0, 90, T0, 60_000) is Plan.STALE
    assert plan_change(exited, Action.ENTERED, 0, 90, T0) is Plan.RESUBSCRIBE  # guard off
    # Within the producers' clock skew the later record wins, as before.
    assert plan_change(exited, Action.ENTERED, 0, 90, T0 + 550_000, 60_000) is Plan.RESUBSCRIBE


def test_an_uncertain_state_is_read_first_even_for_an_old_change() -> None:
    pending = recorded(1, SetBy.SERVICE, True, 0, 5, T0 + 600_000)._replace(pending=1)
    assert plan_change(pending, Action.EXITED, 0, 9, T0, 60_000) is Plan.RECHECK


def event(action: Action, at: int, n: int = 0) -> MembershipEvent:
    return MembershipEvent(f"e{n}", at, "a@example.com", "aud", "VIP", action)


def test_a_stale_group_is_settled_without_a_request() -> None:
    coalescer = Coalescer(window=0)
    coalescer.add(0, A, event(Action.ENTERED, T0), b"r", 90, now=0)
    [group] = coalescer.take_due(0, limit=1, busy=set())
    entry = LedgerEntry("7", 0, (recorded(2, SetBy.SERVICE, True, 0, 5, T0 + 600_000),))
    plan = plan_group(group, entry, {A: "3"}, {}, {}, stale_tolerance_ms=60_000)
    assert plan.route is Route.SETTLED and group[0].plan is Plan.STALE
    assert plan_group(group, entry, {A: "3"}, {}, {}).route is Route.SINGLE  # guard off


def test_the_coalescer_keeps_the_newer_event_when_an_old_one_follows_it() -> None:
    coalescer = Coalescer(window=5, stale_tolerance_ms=60_000)
    coalescer.add(0, A, event(Action.EXITED, T0 + 600_000, 1), b"new", 10, now=0)
    assert coalescer.add(0, A, event(Action.ENTERED, T0, 2), b"old", 11, now=1)
    # within the tolerance the later record still wins
    coalescer.add(0, A, event(Action.ENTERED, T0 + 590_000, 3), b"skewed", 12, now=2)
    [[change]] = coalescer.take_due(10, limit=1, busy=set())
    assert change.event.event_id == "e3" and change.raw == b"skewed"
    assert change.offsets == [10, 11, 12]  # the stale record is covered: committed with it

    unguarded = Coalescer(window=5)
    unguarded.add(0, A, event(Action.EXITED, T0 + 600_000, 1), b"new", 10, now=0)
    unguarded.add(0, A, event(Action.ENTERED, T0, 2), b"old", 11, now=1)
    [[change]] = unguarded.take_due(10, limit=1, busy=set())
    assert change.event.event_id == "e2"


def test_the_tolerance_setting() -> None:
    assert load_settings(env()).stale_event_tolerance_seconds == 60.0
    assert load_settings(env(STALE_EVENT_TOLERANCE_SECONDS="0")).stale_event_tolerance_seconds == 0
    assert (
        load_settings(env(STALE_EVENT_TOLERANCE_SECONDS="off")).stale_event_tolerance_seconds
        is None
    )
    with pytest.raises(ConfigError, match="STALE_EVENT_TOLERANCE_SECONDS"):
        load_settings(env(STALE_EVENT_TOLERANCE_SECONDS="-1"))


def test_explain_says_what_is_stale_and_how_far_the_state_is_trusted() -> None:
    imported = recorded(1, SetBy.SERVICE, False, 0, 5, T0)
    text = "\n".join(
        explain_lines("a@example.com", LedgerEntry(None, 0, (imported,)), None, 60_000)
    )
    assert "occurred before 2023-11-14T22:12:20.000+00:00 is skipped as stale" in text
    assert "not verified: subscribed by an import" in text
    data = explain_json(
        "a@example.com", LedgerEntry(None, 0, (imported._replace(pending=2),)), None
    )
    [item] = data["lists"]
    assert item["pending"] == [2] and item["verified"] is False and item["stale_before"] is None
    assert item["trust"].startswith("uncertain: a write of ours (unsubscribed)")

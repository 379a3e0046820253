"""``plan_group``: what one email's due changes need from AC, decided from the ledger, and the
route the group takes (settled, recheck, verify, single, bulk)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.coalesce import ListRef, PendingChange
from service.core.ledger import LedgerEntry, ListState, Plan, SetBy, fields_hash
from service.core.model import Action, MembershipEvent
from service.pipeline.plan import GroupPlan, Route, plan_group

E, X = Action.ENTERED, Action.EXITED
A, B = ListRef(name="A"), ListRef(name="B")
BY_ID = ListRef(list_id="7")
ATTRS = {"first_name": "firstName"}
FIELDS = {"plan": "12"}


def change(
    target: ListRef = A,
    action: Action = E,
    offsets: tuple[int, ...] = (20,),
    at: int = 2000,
    attributes: dict[str, str] | None = None,
    plan: Plan = Plan.SKIP,
) -> PendingChange:
    event = MembershipEvent("ev", at, "x@y.com", "aud", "A", action, attributes=attributes or {})
    c = PendingChange(0, "x@y.com", target, event, None, list(offsets), 0.0, 5.0)
    c.plan = plan
    return c


def state(
    label: str = "A",
    status: int = 1,
    set_by: SetBy = SetBy.SERVICE,
    *,
    offset: int = 10,
    at: int = 1000,
    verified: bool = True,
    list_id: str | None = None,
    pending: int = 0,
) -> ListState:
    return ListState(
        label, status, set_by, "ev-1", at, at, 0, offset, "aud", label, None, None, verified,
        list_id, pending,
    )  # fmt: skip


def entry(*states: ListState, fields: int = 0) -> LedgerEntry:
    return LedgerEntry("55", fields, states)


def plan(group: list[PendingChange], e: LedgerEntry | None, **kw: object) -> GroupPlan:
    return plan_group(group, e, {BY_ID: "7"}, ATTRS, FIELDS, **kw)  # type: ignore[arg-type]


def test_a_state_the_ledger_holds_is_settled_without_a_request() -> None:
    group = [change(action=E)]
    assert plan(group, entry(state(status=1))) == GroupPlan(Route.SETTLED, None, 0)
    assert group[0].plan is Plan.SKIP
    assert group[0].previous == state(status=1)


def test_a_kept_opt_out_is_settled_too() -> None:
    group = [change(action=E)]
    assert plan(group, entry(state(status=2, set_by=SetBy.PERSON))).route is Route.SETTLED
    assert group[0].plan is Plan.CONSENT_KEPT


def test_a_first_entry_goes_in_an_import() -> None:
    group = [change(action=E)]
    assert plan(group, None) == GroupPlan(Route.BULK, None, 0)
    assert group[0].plan is Plan.FIRST_ENTRY and group[0].previous is None


def test_changed_fields_go_in_an_import_even_when_every_list_is_settled() -> None:
    group = [change(action=E, attributes={"first_name": "Ann", "plan": "gold", "x": "dropped"})]
    value = fields_hash({"firstName": "Ann"}, {"12": "gold"})
    assert value != 0
    assert plan(group, entry(state(status=1))) == GroupPlan(
        Route.BULK, ({"firstName": "Ann"}, {"12": "gold"}), value
    )
    # the ledger already holds these fields: nothing to send
    assert plan(group, entry(state(status=1), fields=value)) == GroupPlan(
        Route.SETTLED, None, value
    )


def test_fields_of_a_group_without_a_ledger_entry_are_sent() -> None:
    group = [change(action=E, attributes={"first_name": "Ann"})]
    result = plan(group, None)
    assert result.fields == ({"firstName": "Ann"}, {})
    assert result.fields_hash == fields_hash({"firstName": "Ann"}, {})


def test_unmapped_attributes_alone_change_nothing() -> None:
    group = [change(action=E, attributes={"unmapped": "v"})]
    assert plan(group, entry(state(status=1), fields=99)) == GroupPlan(Route.SETTLED, None, 0)


def test_an_exit_of_our_subscription_is_verified_first() -> None:
    group = [change(action=X)]
    assert plan(group, entry(state(status=1))).route is Route.VERIFY
    assert group[0].plan is Plan.EXIT


def test_a_reentry_after_our_verified_unsubscribe_goes_per_contact() -> None:
    group = [change(action=E)]
    assert plan(group, entry(state(status=2, set_by=SetBy.SERVICE))).route is Route.SINGLE
    assert group[0].plan is Plan.RESUBSCRIBE


def test_a_change_ac_refused_in_an_import_goes_per_contact() -> None:
    group = [change(action=E)]
    group[0].force_single = True
    assert plan(group, None).route is Route.SINGLE


def test_an_uncertain_state_is_read_first_whatever_else_the_group_needs() -> None:
    group = [
        change(A, action=X),
        change(B, action=E),
    ]
    e = entry(state("A", status=1), state("B", status=2, pending=1))
    assert plan(group, e).route is Route.RECHECK
    assert [c.plan for c in group] == [Plan.EXIT, Plan.RECHECK]


def test_routes_are_chosen_in_order_recheck_verify_single_bulk() -> None:
    e = entry(state("A", status=1), state("B", status=2))
    group = [change(A, action=X), change(B, action=E)]  # EXIT and RESUBSCRIBE
    assert plan(group, e).route is Route.VERIFY
    group = [change(A, action=E), change(B, action=E)]  # SKIP and RESUBSCRIBE
    assert plan(group, e).route is Route.SINGLE
    group = [change(A, action=E), change(B, action=E)]
    group[0].force_single = True
    assert plan(group, entry(state("B", status=2, set_by=SetBy.PERSON))).route is Route.SINGLE


def test_a_list_named_by_id_reads_only_the_state_recorded_for_that_id() -> None:
    group = [change(BY_ID, action=E)]
    # recorded for list id 7: the state holds
    assert plan(group, entry(state("#7", status=1, list_id="7"))).route is Route.SETTLED
    # recorded for list id 6 (deleted and created again since): no state, a first entry
    group = [change(BY_ID, action=E)]
    assert plan(group, entry(state("#7", status=1, list_id="6"))).route is Route.BULK
    assert group[0].previous is None and group[0].plan is Plan.FIRST_ENTRY


def test_the_last_offset_and_the_event_time_decide_a_replay() -> None:
    recorded = entry(state(status=2, set_by=SetBy.SERVICE, offset=10, at=1000))
    # every record at or before the recorded one: a replay, skipped
    group = [change(action=E, offsets=(9, 10), at=1000)]
    assert plan(group, recorded).route is Route.SETTLED
    # the change's last record is later: not a replay
    group = [change(action=E, offsets=(9, 11), at=1000)]
    assert plan(group, recorded).route is Route.SINGLE
    # a later event time: not a replay either
    group = [change(action=E, offsets=(9, 10), at=1001)]
    assert plan(group, recorded).route is Route.SINGLE


def test_a_fresh_verification_keeps_its_unsubscribe() -> None:
    group = [change(action=X, plan=Plan.UNSUBSCRIBE)]
    group[0].verified_at = 50.0
    assert plan(group, entry(state(status=1)), verified_after=50.0).route is Route.BULK
    assert group[0].plan is Plan.UNSUBSCRIBE
    assert group[0].previous is None  # not decided again: left as it was


def test_an_old_verification_is_asked_again() -> None:
    group = [change(action=X, plan=Plan.UNSUBSCRIBE)]
    group[0].verified_at = 49.0
    assert plan(group, entry(state(status=1)), verified_after=50.0).route is Route.VERIFY
    assert group[0].plan is Plan.EXIT


def test_a_verification_before_an_uncertain_write_is_asked_again() -> None:
    group = [change(action=X, plan=Plan.UNSUBSCRIBE)]
    group[0].verified_at = 60.0
    e = entry(state(status=1, pending=2))
    assert plan(group, e, verified_after=50.0).route is Route.RECHECK
    assert group[0].plan is Plan.RECHECK


def test_by_default_any_verification_holds() -> None:
    group = [change(action=X, plan=Plan.UNSUBSCRIBE)]
    assert plan(group, None).route is Route.BULK
    assert group[0].plan is Plan.UNSUBSCRIBE


LEDGER_STATES = st.builds(
    state,
    label=st.sampled_from(["A", "B"]),
    status=st.sampled_from([1, 2]),
    set_by=st.sampled_from(SetBy),
    offset=st.integers(0, 30),
    verified=st.booleans(),
    pending=st.sampled_from([0, 0, 1, 2, 11]),
)


@given(
    st.lists(LEDGER_STATES, max_size=2, unique_by=lambda s: s.list),
    st.lists(
        st.tuples(st.sampled_from([A, B]), st.sampled_from(Action), st.integers(0, 30)),
        min_size=1,
        max_size=2,
        unique_by=lambda t: t[0],
    ),
    st.booleans(),
)
def test_the_route_follows_from_the_plans(
    states: list[ListState], changes: list[tuple[ListRef, Action, int]], single: bool
) -> None:
    group = [change(t, action=a, offsets=(o,)) for t, a, o in changes]
    group[0].force_single = single
    result = plan(group, entry(*states) if states else None)
    plans = {c.plan for c in group}
    if Plan.RECHECK in plans:
        assert result.route is Route.RECHECK
    elif plans <= {Plan.SKIP, Plan.CONSENT_KEPT}:
        assert result.route is Route.SETTLED
    elif Plan.EXIT in plans:
        assert result.route is Route.VERIFY
    elif Plan.RESUBSCRIBE in plans or single:
        assert result.route is Route.SINGLE
    else:
        assert result.route is Route.BULK
    assert result.fields is None


def test_a_fresh_unsubscribe_does_not_stop_the_rest_of_the_group_being_decided() -> None:
    fresh = change(A, action=X, plan=Plan.UNSUBSCRIBE)
    fresh.verified_at = 60.0
    other = change(B, action=E)
    e = entry(state("A", status=1), state("B", status=2, set_by=SetBy.SERVICE))
    assert plan([fresh, other], e, verified_after=50.0).route is Route.SINGLE
    assert other.plan is Plan.RESUBSCRIBE


def test_a_skip_and_a_kept_opt_out_together_are_settled() -> None:
    group = [change(A, action=E), change(B, action=E)]
    e = entry(state("A", status=1), state("B", status=2, set_by=SetBy.PERSON))
    assert plan(group, e) == GroupPlan(Route.SETTLED, None, 0)
    assert {c.plan for c in group} == {Plan.SKIP, Plan.CONSENT_KEPT}


def test_a_skip_a_stale_change_and_a_kept_opt_out_together_are_settled() -> None:
    c = ListRef(name="C")
    group = [change(A, action=E), change(B, action=E), change(c, action=E)]
    e = entry(
        state("A", status=1),
        state("B", status=2, set_by=SetBy.PERSON),
        state("C", status=2, set_by=SetBy.SERVICE, at=100_000),  # applied long after the change
    )
    assert plan(group, e, stale_tolerance_ms=1000) == GroupPlan(Route.SETTLED, None, 0)
    assert [ch.plan for ch in group] == [Plan.SKIP, Plan.CONSENT_KEPT, Plan.STALE]


@pytest.mark.parametrize(
    ("recorded", "action", "route"),
    [
        (state(status=1, pending=1), E, Route.RECHECK),
        (state(status=1), X, Route.VERIFY),
        (state(status=2, set_by=SetBy.SERVICE), E, Route.SINGLE),
        (None, E, Route.BULK),
    ],
)
def test_every_route_that_sends_carries_the_changed_fields(
    recorded: ListState | None, action: Action, route: Route
) -> None:
    group = [change(action=action, attributes={"first_name": "Ann"})]
    value = fields_hash({"firstName": "Ann"}, {})
    e = entry(recorded) if recorded else None
    assert plan(group, e) == GroupPlan(route, ({"firstName": "Ann"}, {}), value)

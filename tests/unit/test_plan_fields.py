"""``plan_group`` and fields: which contacts fields may go to (a contact the service subscribes or knows, never an exit-only email)."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from service.core.coalesce import Coalescer, ListRef, PendingChange
from service.core.ledger import EXIT_SEEN, LedgerEntry, ListState, Plan, SetBy
from service.core.model import Action, MembershipEvent
from service.pipeline.plan import Route, plan_group

A = ListRef(name="VIP")
T0 = 1_700_000_000_000
FIELDS = {"first_name": "firstName"}


def group(action: Action) -> list[PendingChange]:
    coalescer = Coalescer(window=0)
    event = MembershipEvent(
        "e1", T0, "a@example.com", "aud", "VIP", action, attributes={"first_name": "Pat"}
    )
    coalescer.add(0, A, event, b"r", 5, now=0)
    [taken] = coalescer.take_due(0, limit=1, busy=set())
    return taken


def test_an_exit_of_someone_never_subscribed_sends_no_fields_so_creates_no_contact() -> None:
    """Found by the dry run: an exit-only email with attributes went out as a field update,
    which AC's upserts turn into a new contact."""
    plan = plan_group(group(Action.EXITED), None, {A: "3"}, FIELDS, {})
    assert plan.route is Route.SETTLED and plan.fields is None
    seen = ListState("VIP", *EXIT_SEEN[:2], "e0", T0 - 9, T0, 0, 1, "aud", "VIP", None, None, False)
    plan = plan_group(group(Action.EXITED), LedgerEntry(None, 0, (seen,)), {A: "3"}, FIELDS, {})
    assert plan.fields is None


def test_fields_go_with_an_entry_and_to_a_contact_that_exists() -> None:
    plan = plan_group(group(Action.ENTERED), None, {A: "3"}, FIELDS, {})
    assert plan.route is Route.BULK and plan.fields == ({"firstName": "Pat"}, {})
    known = LedgerEntry("42", 0, ())  # a contact AC has (its id is known)
    plan = plan_group(group(Action.EXITED), known, {A: "3"}, FIELDS, {})
    assert plan.fields == ({"firstName": "Pat"}, {})
    ours = ListState(
        "Other", 1, SetBy.SERVICE, "e0", T0 - 9, T0, 0, 1, "aud", "Other", None, None, True
    )
    plan = plan_group(group(Action.EXITED), LedgerEntry(None, 0, (ours,)), {A: "3"}, FIELDS, {})
    assert plan.fields is not None


# What a change of the group sends or reads at AC: fields may ride along with it.
REQUESTS = {Plan.FIRST_ENTRY, Plan.RESUBSCRIBE, Plan.EXIT, Plan.UNSUBSCRIBE, Plan.RECHECK}


@given(
    action=st.sampled_from(Action),
    contact_id=st.sampled_from([None, "42"]),
    states=st.lists(
        st.tuples(
            st.sampled_from(["VIP", "Other"]), st.sampled_from([1, 2]), st.sampled_from(SetBy)
        ),
        max_size=2,
        unique_by=lambda t: t[0],
    ),
)
@example(action=Action.EXITED, contact_id=None, states=[("Other", 2, SetBy.SERVICE)])
@example(action=Action.EXITED, contact_id=None, states=[("Other", 1, SetBy.UNKNOWN)])
@example(action=Action.EXITED, contact_id=None, states=[("Other", 2, SetBy.PERSON)])
def test_fields_go_only_with_a_request_or_to_a_contact_the_service_knows(
    action: Action, contact_id: str | None, states: list[tuple[str, int, SetBy]]
) -> None:
    """Changed fields are sent when the group sends or reads something anyway, or when the
    contact exists for the service: its id is known, or a list holds a subscription, or a state
    the service set (it subscribed them once). Otherwise (an exit of someone never ours) they
    would create the contact."""
    lists = tuple(
        ListState(label, status, by, "e0", T0 - 9, T0, 0, 1, "aud", label, None, None, True)
        for label, status, by in states
    )
    entry = LedgerEntry(contact_id, 0, lists) if contact_id or lists else None
    taken = group(action)
    plan = plan_group(taken, entry, {A: "3"}, FIELDS, {})
    known = contact_id is not None or any(s == 1 or by is SetBy.SERVICE for _, s, by in states)
    sent = taken[0].plan in REQUESTS or known
    assert plan.fields == (({"firstName": "Pat"}, {}) if sent else None)

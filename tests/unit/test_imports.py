"""The import lifecycle (``ImportLifecycle``): a state machine on ``now`` that returns the
actions the loop carries out. Write-ahead before sending; an outcome that may still land keeps
its emails blocked; every way out deletes the intents and releases the emails."""

from __future__ import annotations

import itertools
import logging
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.adapters.ledger_store import Intent
from service.core.acapi import ImportStatus
from service.core.backoff import backoff_delay
from service.core.budget import ImportBudget
from service.core.bulk import Submitted
from service.core.coalesce import ListRef, PendingChange
from service.core.errors import (
    AuthRejected,
    PermanentApiError,
    RateLimited,
    TransientApiError,
)
from service.core.ledger import SUBSCRIBED_BY_IMPORT, UNSUBSCRIBED_BY_US, Plan
from service.core.model import Action, MembershipEvent
from service.pipeline.import_actions import (
    DeleteIntent,
    Fail,
    Group,
    Landed,
    Learn,
    Record,
    Release,
    Requeue,
    State,
    WriteBudget,
    WriteIntent,
)
from service.pipeline.imports import ImportLifecycle

STAMP = {0: 3, 1: 4}


def pending(email: str, partition: int, plan: Plan = Plan.FIRST_ENTRY) -> PendingChange:
    event = MembershipEvent("ev", 1000, email, "aud", "A", Action.ENTERED)
    c = PendingChange(partition, email, ListRef(name="A"), event, None, [1], 0.0, 0.0)
    c.plan = plan
    return c


def group(email: str, partition: int, *plans: Plan) -> Group:
    return Group(
        email, partition, [pending(email, partition, p) for p in plans or (Plan.FIRST_ENTRY,)]
    )


def lifecycle(
    budget: ImportBudget | None = None, timeout: float = 600.0, give_up: float = 3600.0
) -> ImportLifecycle:
    ids = (f"imp-{n}" for n in itertools.count(1))
    return ImportLifecycle(
        budget or ImportBudget(),
        timeout,
        random.Random(7),
        new_id=lambda: next(ids),
        give_up=give_up,
    )


def shared_budget() -> ImportBudget:
    budget = ImportBudget(per_minute=100)
    budget.share(frozenset({0, 1}), 4)
    budget.adopt(0, [])
    budget.adopt(1, [])
    return budget


def ready(life: ImportLifecycle, groups: list[Group], now: float = 100.0, wall: float = 5000.0):  # type: ignore[no-untyped-def]
    """An import prepared, every write-ahead acknowledged: on its way."""
    imp, _ = life.prepare(groups, [{"email": g.email} for g in groups], dict(STAMP), now, wall)
    for _ in range(imp.acks_due):
        life.acked(imp.import_id)
    assert imp.state is State.SUBMITTING
    return imp


def queued(life: ImportLifecycle, groups: list[Group], now: float = 100.0):  # type: ignore[no-untyped-def]
    imp = ready(life, groups, now)
    life.submitted(
        imp.import_id, Submitted("b-1", list(range(len(groups))), requests=1), now, 5000.0
    )
    assert imp.state is State.QUEUED
    return imp


def closes(import_id: str, partitions: list[int], emails: set[str]) -> list[object]:
    return [*(DeleteIntent(p, import_id) for p in partitions), Release(emails)]


# ---- preparing --------------------------------------------------------------------------


def test_prepare_charges_the_budget_and_writes_one_intent_per_partition() -> None:
    life = lifecycle()
    groups = [group("a@x.co", 1), group("b@x.co", 0), group("c@x.co", 1)]
    imp, actions = life.prepare(groups, [{"e": 1}], dict(STAMP), 100.0, 5000.0)
    assert imp.import_id == "imp-1" and life.imports == {"imp-1": imp}
    assert imp.emails == {1: ("a@x.co", "c@x.co"), 0: ("b@x.co",)}
    assert imp.groups == groups and imp.entries == [{"e": 1}] and imp.stamp == STAMP
    assert imp.started == 100.0 and imp.state is State.PREPARING
    assert imp.charge == 1 and imp.acks_due == 2
    assert actions == [
        WriteIntent(1, Intent("imp-1", None, ("a@x.co", "c@x.co"), 5000.0), "imp-1"),
        WriteIntent(0, Intent("imp-1", None, ("b@x.co",), 5000.0), "imp-1"),
    ]
    assert not life.shared
    assert life.budget.left(5000.0) == pytest.approx(97)
    second, _ = life.prepare([group("d@x.co", 0)], [], {}, 101.0, 5001.0)
    assert second.import_id == "imp-2" and second.charge == 2


def test_a_shared_budget_writes_the_charged_partitions_history_ahead() -> None:
    life = lifecycle(shared_budget())
    assert life.shared
    imp, actions = life.prepare([group("a@x.co", 0)], [], dict(STAMP), 100.0, 5000.0)
    budgets = [a for a in actions if isinstance(a, WriteBudget)]
    assert budgets and {b.partition for b in budgets} <= {0, 1}
    for b in budgets:
        assert b.history == life.budget.history(b.partition, 5000.0)
    assert sum(imports for b in budgets for _, imports in b.history) == pytest.approx(1.0)
    assert actions[len(budgets) :] == [
        WriteIntent(0, Intent(imp.import_id, None, ("a@x.co",), 5000.0), imp.import_id)
    ]


def test_an_import_leaves_only_once_every_write_ahead_is_acknowledged() -> None:
    life = lifecycle()
    imp, _ = life.prepare([group("a@x.co", 0), group("b@x.co", 1)], [], {}, 1.0, 1.0)
    assert not life.acked(imp.import_id)
    assert imp.state is State.PREPARING and imp.acks_due == 1
    assert life.acked(imp.import_id)
    assert imp.state is State.SUBMITTING and imp.acks_due == 0
    assert not life.acked(imp.import_id)  # a late extra ack sends nothing twice
    assert imp.acks_due == 0
    assert not life.acked("nobody")


def test_a_caller_counted_ack_is_awaited_too() -> None:
    life = lifecycle()
    imp, _ = life.prepare([group("a@x.co", 0)], [], {}, 1.0, 1.0)
    imp.acks_due += 1  # a write-ahead record the caller writes itself
    assert not life.acked(imp.import_id)
    assert life.acked(imp.import_id)


# ---- submitted ----------------------------------------------------------------------------


def test_a_queued_import_writes_its_batch_id_ahead_and_polls_at_the_expected_time() -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0), group("b@x.co", 1), group("c@x.co", 0)])
    actions = life.submitted(imp.import_id, Submitted("b-9", [0, 1, 2], requests=1), 110.0, 5010.0)
    assert actions == [
        WriteIntent(0, Intent(imp.import_id, "b-9", ("a@x.co", "c@x.co"), 5010.0), imp.import_id),
        WriteIntent(1, Intent(imp.import_id, "b-9", ("b@x.co",), 5010.0), imp.import_id),
    ]
    assert imp.state is State.QUEUED and imp.batch_id == "b-9"
    assert imp.next_poll_at == pytest.approx(112.0)  # the expected 2 s
    # the charge now counts from when the request returned
    assert life.budget.history(-1, 5010.0) == [(5010.0, 1.0)]


def test_contacts_ac_refused_go_back_per_contact_and_the_rest_is_queued() -> None:
    life = lifecycle()
    a, b = group("a@x.co", 0), group("b@x.co", 0, Plan.FIRST_ENTRY, Plan.UNSUBSCRIBE)
    imp = ready(life, [a, b])
    actions = life.submitted(
        imp.import_id, Submitted("b-1", [0], rejected=[1], requests=2), 110.0, 5010.0
    )
    assert actions[0] == Requeue(b.changes, STAMP, force_single=True, not_queued=True)
    assert actions[1:] == [
        WriteIntent(0, Intent(imp.import_id, "b-1", ("a@x.co",), 5010.0), imp.import_id)
    ]
    assert imp.groups == [a]
    # two requests reached AC: both are charged, both dated when they returned
    assert life.budget.history(-1, 5010.0) == [(5010.0, 1.0), (5010.0, 1.0)]


def test_every_request_of_a_shared_budget_is_written_to_the_charged_partitions() -> None:
    life = lifecycle(shared_budget())
    imp = ready(life, [group("a@x.co", 0)])
    actions = life.submitted(imp.import_id, Submitted("b-1", [0], requests=3), 110.0, 5010.0)
    budgets = [a for a in actions if isinstance(a, WriteBudget)]
    assert [b.partition for b in budgets] == sorted({b.partition for b in budgets})
    assert budgets
    total = sum(imports for p in (0, 1) for _, imports in life.budget.history(p, 5010.0))
    assert total == pytest.approx(3.0)
    for b in budgets:
        assert b.history == life.budget.history(b.partition, 5010.0)
        assert all(at == 5010.0 for at, _ in b.history)


def test_a_crashed_submission_leaves_the_outcome_unknown(caplog: pytest.LogCaptureFixture) -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0)])
    with caplog.at_level(logging.WARNING, logger="service.pipeline.imports"):
        assert life.submitted(imp.import_id, RuntimeError("boom"), 120.0, 5020.0) == []
    assert imp.state is State.UNKNOWN
    assert life.next_summary_at == 120.0  # no summary planned: asked at once
    assert life.imports == {imp.import_id: imp}
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert messages == [
        (logging.ERROR, "import submission crashed; its outcome is unknown"),
        (
            logging.WARNING,
            "an import's outcome is unknown: its emails wait until AC reports none outstanding",
        ),
    ]
    assert caplog.records[0].exc_info is not None
    assert caplog.records[1].__dict__["import"] == imp.import_id
    assert caplog.records[1].__dict__["contacts"] == 1
    assert life.budget.history(-1, 5020.0) == [(5020.0, 1.0)]  # AC may have counted it


def test_an_earlier_summary_time_is_kept() -> None:
    life = lifecycle()
    life.next_summary_at = 120.5
    imp = ready(life, [group("a@x.co", 0)])
    life.submitted(imp.import_id, TransientApiError(502, "bad gateway"), 120.0, 5020.0)
    assert life.next_summary_at == 120.5
    life.next_summary_at = 200.0
    imp = ready(life, [group("b@x.co", 0)])
    life.submitted(imp.import_id, TransientApiError(502, "bad gateway"), 120.0, 5020.0)
    assert life.next_summary_at == 121.0


def test_a_request_refused_whole_needs_no_intent() -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0), group("b@x.co", 1)])
    error = PermanentApiError(422, "invalid", "every contact refused")
    actions = life.submitted(imp.import_id, Submitted(None, [], [0, 1], error, 1), 110.0, 5010.0)
    changes = [c for g in imp.groups for c in g.changes]
    assert actions == [
        Requeue(changes, STAMP, force_single=True, not_queued=True),
        *closes(imp.import_id, [0, 1], {"a@x.co", "b@x.co"}),
    ]
    assert life.imports == {}


def test_acs_import_limit_pauses_imports_and_sends_the_changes_back() -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0)])
    error = RateLimited(60.0, 400, "bulk import rate limit exceeded")
    actions = life.submitted(imp.import_id, Submitted(None, [0], [], error, 1), 110.0, 5010.0)
    assert actions == [
        Requeue(imp.groups[0].changes, STAMP),
        *closes(imp.import_id, [0], {"a@x.co"}),
    ]
    assert life.budget.paused_until == 5070.0
    assert not life.budget.available(5069.9) and life.budget.available(5070.0)


def test_a_429_on_the_import_is_not_the_import_limit() -> None:
    """Not queued: each change gets the error (``RateLimited``: retried after Retry-After);
    the import budget is not paused (the request budget is, by the transport)."""
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0)])
    error = RateLimited(5.0, 429)
    actions = life.submitted(imp.import_id, Submitted(None, [0], [], error, 1), 110.0, 5010.0)
    assert actions == [
        Fail(imp.groups[0].changes, error, STAMP),
        *closes(imp.import_id, [0], {"a@x.co"}),
    ]
    assert life.budget.paused_until == float("-inf")


def test_an_import_refused_as_a_whole_goes_per_contact() -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0), group("b@x.co", 0)])
    error = PermanentApiError(400, "bad", "refused")
    actions = life.submitted(imp.import_id, Submitted(None, [1], [], error, 1), 110.0, 5010.0)
    assert actions == [
        Requeue(imp.groups[1].changes, STAMP, force_single=True),
        *closes(imp.import_id, [0], {"a@x.co", "b@x.co"}),
    ]


@pytest.mark.parametrize("status", [401, 403, 404, 499])
def test_a_refusal_that_is_no_record_s_fault_fails_every_change(status: int) -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0)])
    error = AuthRejected(status, "token refused")
    actions = life.submitted(imp.import_id, Submitted(None, [0], [], error, 1), 110.0, 5010.0)
    assert actions == [
        Fail(imp.groups[0].changes, error, STAMP),
        *closes(imp.import_id, [0], {"a@x.co"}),
    ]


@pytest.mark.parametrize("status", [408, 500, 503, None])
def test_a_timeout_or_server_error_may_have_queued_it(status: int | None) -> None:
    life = lifecycle()
    a, b = group("a@x.co", 0), group("b@x.co", 1)
    imp = ready(life, [a, b])
    error = TransientApiError(status, "maybe")
    assert life.submitted(imp.import_id, Submitted(None, [1], [], error, 1), 110.0, 5010.0) == []
    assert imp.state is State.UNKNOWN and imp.groups == [b]
    assert imp.emails == {0: ("a@x.co",), 1: ("b@x.co",)}  # every intent stays


def test_a_submission_of_an_import_no_longer_submitting_is_ignored() -> None:
    life = lifecycle()
    imp, _ = life.prepare([group("a@x.co", 0)], [], {}, 1.0, 1.0)
    assert life.submitted(imp.import_id, Submitted("b", [0], requests=1), 2.0, 2.0) == []
    assert imp.state is State.PREPARING
    assert life.submitted("gone", Submitted("b", [0], requests=1), 2.0, 2.0) == []
    life.acked(imp.import_id)
    imp.adopted = True  # a restored intent of the same id is followed instead
    assert life.submitted(imp.import_id, Submitted("b", [0], requests=1), 2.0, 2.0) == []
    assert imp.state is State.SUBMITTING


# ---- polling ------------------------------------------------------------------------------


def test_only_queued_imports_whose_time_came_are_polled() -> None:
    life = lifecycle()
    imp = queued(life, [group("a@x.co", 0)])
    assert life.polls_due(101.9) == []
    assert life.polls_due(102.0) == [imp]
    life.polling(imp, 102.0)
    assert imp.next_poll_at == float("inf") and life.polls_due(10_000.0) == []
    imp.next_poll_at = 0.0
    imp.batch_id = None
    assert life.polls_due(10.0) == []
    other = ready(life, [group("b@x.co", 0)])
    other.next_poll_at = 0.0
    assert life.polls_due(10.0) == []  # submitting: nothing to poll yet


def test_a_completed_import_records_what_each_change_left_in_ac() -> None:
    life = lifecycle()
    a = group("a@x.co", 0, Plan.FIRST_ENTRY, Plan.UNSUBSCRIBE, Plan.SKIP)
    b = group("b@x.co", 1)
    imp = queued(life, [a, b])
    status = ImportStatus(True, ["11", "12"], [])
    actions = life.polled(imp.import_id, status, 110.0)
    assert actions == [
        Record(a, {0: SUBSCRIBED_BY_IMPORT, 1: UNSUBSCRIBED_BY_US, 2: None}, STAMP),
        Record(b, {0: SUBSCRIBED_BY_IMPORT}, STAMP),
        Learn(["11", "12"], {"a@x.co": (0, 3), "b@x.co": (1, 4)}),
        *closes(imp.import_id, [0, 1], {"a@x.co", "b@x.co"}),
    ]
    # Done at its first poll, 10 s after it was queued: AC took at most that (the poll may have
    # waited behind other requests), so the expected time does not grow from it; it drifts
    # down (0.9 of the estimate), so that it does not stay stuck above AC's time.
    assert life.expected_seconds == pytest.approx(0.7 * 2.0 + 0.3 * 0.9 * 2.0)
    assert life.imports == {}


def test_the_expected_time_learns_at_most_a_minute_from_one_import() -> None:
    life = lifecycle()
    imp = queued(life, [group("a@x.co", 0)])
    life.polled(imp.import_id, ImportStatus(False, [], []), 100.0 + 90.0)  # still processing
    life.polled(imp.import_id, ImportStatus(True, [], []), 100.0 + 600.0)
    assert life.expected_seconds == pytest.approx(0.7 * 2.0 + 0.3 * 60.0)


def test_a_late_first_poll_never_pushes_the_next_first_polls_later() -> None:
    """A first load's polls waited behind each minute's burst of imports; learned as AC's
    processing time, that delay set every next first poll 20-30 s out, the drain's last
    confirmation too. Done at the first poll: the estimate may fall, never rise."""
    life = lifecycle()
    expected = 2.0
    for n, done_after in enumerate([25.0, 30.0, 28.0]):
        imp = queued(life, [group(f"p{n}@x.co", n)])
        life.polled(imp.import_id, ImportStatus(True, [], []), imp.queued_at + done_after)
        expected = 0.7 * expected + 0.3 * 0.9 * expected  # drifts down, never up
        assert life.expected_seconds == pytest.approx(expected)
    quick = queued(life, [group("q@x.co", 9)])
    life.polled(quick.import_id, ImportStatus(True, [], []), quick.queued_at + 1.0)
    expected = 0.7 * expected + 0.3 * 0.9 * 1.0
    assert life.expected_seconds == pytest.approx(expected)
    # Still processing at 1.7 s, done by the next poll at 5.0 s: AC took between the two; the
    # sample is 1.2 times the lower end, not the poll's 5.0 s.
    slow = queued(life, [group("s@x.co", 10)])
    life.polled(slow.import_id, ImportStatus(False, [], []), slow.queued_at + 1.7)
    life.polled(slow.import_id, ImportStatus(True, [], []), slow.queued_at + 5.0)
    assert life.expected_seconds == pytest.approx(0.7 * expected + 0.3 * 1.2 * 1.7)
    # Done soon after the "processing": the sample stays within the interval.
    soon = queued(life, [group("t@x.co", 11)])
    before = life.expected_seconds
    life.polled(soon.import_id, ImportStatus(False, [], []), soon.queued_at + 3.0)
    life.polled(soon.import_id, ImportStatus(True, [], []), soon.queued_at + 3.1)
    assert life.expected_seconds == pytest.approx(0.7 * before + 0.3 * 3.1)


def test_emails_ac_reports_as_failed_go_back_per_contact() -> None:
    life = lifecycle()
    a, b = group("a@x.co", 0), group("b@x.co", 5)
    imp = queued(life, [a, b])
    actions = life.polled(imp.import_id, ImportStatus(True, ["11"], [" A@X.co "]), 110.0)
    assert actions == [
        Record(b, {0: SUBSCRIBED_BY_IMPORT}, STAMP),
        Learn(["11"], {"b@x.co": (5, -1)}),  # a partition missing from the stamp: -1
        Requeue(a.changes, STAMP, force_single=True, not_queued=True),
        *closes(imp.import_id, [0, 5], {"a@x.co", "b@x.co"}),
    ]


def test_nothing_to_learn_without_success_ids() -> None:
    life = lifecycle()
    a = group("a@x.co", 0)
    imp = queued(life, [a])
    actions = life.polled(imp.import_id, ImportStatus(True, [], []), 110.0)
    assert not any(isinstance(x, Learn) for x in actions)


def test_an_import_still_processing_is_polled_again_later_and_later() -> None:
    life = lifecycle()
    imp = queued(life, [group("a@x.co", 0)])
    assert life.polled(imp.import_id, ImportStatus(False, [], []), 102.0) == []
    # Just early at the expected time (2 s): soon again (half of it, at least a second).
    assert imp.polls == 1 and imp.next_poll_at == pytest.approx(102.0 + 1.0)
    assert life.polled(imp.import_id, ImportStatus(False, [], []), 103.0) == []
    assert imp.polls == 2 and imp.next_poll_at == pytest.approx(103.0 + 3.0)
    assert life.polled(imp.import_id, ImportStatus(False, [], []), 106.0) == []
    assert imp.polls == 3 and imp.next_poll_at == pytest.approx(106.0 + 4.5)
    imp.polls = 20
    life.polled(imp.import_id, ImportStatus(False, [], []), 110.0)
    assert imp.next_poll_at == pytest.approx(110.0 + 60.0)  # capped at a minute


def test_an_import_still_processing_keeps_its_emails_until_the_give_up_then_is_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the timeout AC still says "processing": it may land any moment, so its emails stay
    blocked; only past IMPORT_GIVE_UP_SECONDS are its changes resent (abandoned: it may land)."""
    life = lifecycle(timeout=60.0, give_up=120.0)
    a = group("a@x.co", 0)
    imp = queued(life, [a])
    assert life.polled(imp.import_id, ImportStatus(False, [], []), 160.5) == []  # past timeout
    assert imp.state is State.QUEUED
    assert life.polled(imp.import_id, ImportStatus(False, [], []), 220.0) == []  # at give-up
    with caplog.at_level(logging.ERROR, logger="service.pipeline.imports"):
        actions = life.polled(imp.import_id, ImportStatus(False, [], []), 220.5)
    assert actions == [
        Requeue(a.changes, STAMP, abandoned=True),
        *closes(imp.import_id, [0], {"a@x.co"}),
    ]
    [record] = caplog.records
    assert record.getMessage().startswith(
        "import still processing at AC after IMPORT_GIVE_UP_SECONDS; its changes are sent again"
    )
    assert record.__dict__["import"] == imp.import_id
    assert record.__dict__["batch_id"] == "b-1"


def test_a_failed_poll_backs_off_and_respects_retry_after() -> None:
    life = lifecycle()
    imp = queued(life, [group("a@x.co", 0)])
    draws = random.Random(7)
    assert life.polled(imp.import_id, TransientApiError(502, "x"), 102.0) == []
    assert imp.polls == 1
    assert imp.next_poll_at == pytest.approx(102.0 + backoff_delay(0, draws.random(), cap=60.0))
    life.polled(imp.import_id, RateLimited(45.0), 110.0)
    assert imp.polls == 2
    assert imp.next_poll_at == pytest.approx(110.0 + 45.0)
    draws.random()
    imp.polls = 12  # the back-off stops growing at attempt 8
    life.polled(imp.import_id, TransientApiError(None, "timeout"), 120.0)
    assert imp.next_poll_at == pytest.approx(120.0 + backoff_delay(8, draws.random(), cap=60.0))
    assert imp.next_poll_at - 120.0 < 60.0


def test_a_failed_poll_past_the_timeout_makes_the_outcome_unknown() -> None:
    life = lifecycle(timeout=30.0)
    imp = queued(life, [group("a@x.co", 0)])
    assert life.polled(imp.import_id, TransientApiError(502, "x"), 130.0) == []  # at timeout
    assert imp.state is State.QUEUED
    assert life.polled(imp.import_id, TransientApiError(502, "x"), 131.0) == []
    assert imp.state is State.UNKNOWN and life.imports == {imp.import_id: imp}


def test_a_batch_ac_does_not_know_leaves_the_outcome_unknown() -> None:
    life = lifecycle()
    imp = queued(life, [group("a@x.co", 0)])
    assert life.polled(imp.import_id, PermanentApiError(404, "not_found", "no"), 110.0) == []
    assert imp.state is State.UNKNOWN and imp.polls == 0
    imp2 = queued(life, [group("b@x.co", 0)])
    life.polled(imp2.import_id, PermanentApiError(422, "x", "no"), 110.0)
    assert imp2.state is State.QUEUED and imp2.polls == 1  # another refusal: polled again


def test_an_answer_for_an_import_not_queued_is_ignored() -> None:
    life = lifecycle()
    imp = ready(life, [group("a@x.co", 0)])
    assert life.polled(imp.import_id, ImportStatus(True, ["1"], []), 110.0) == []
    assert life.polled("gone", ImportStatus(True, ["1"], []), 110.0) == []
    assert imp.state is State.SUBMITTING and life.imports == {imp.import_id: imp}


# ---- unknown outcomes ---------------------------------------------------------------------


def unknown(life: ImportLifecycle, email: str, now: float) -> object:
    imp = ready(life, [group(email, 0)], now)
    life.submitted(imp.import_id, TransientApiError(None, "timeout"), now, 5000.0)
    assert imp.state is State.UNKNOWN
    return imp


def test_the_summary_is_asked_only_while_an_outcome_is_unknown_and_one_at_a_time() -> None:
    life = lifecycle()
    queued(life, [group("q@x.co", 0)])
    assert not life.summary_due(1000.0)
    life.next_summary_at = 200.0
    unknown(life, "a@x.co", 100.0)
    assert life.next_summary_at == 101.0
    assert not life.summary_due(100.9)
    assert life.summary_due(101.0)
    life.asking_summary(101.0)
    assert life.summary_asked_at == 101.0
    assert not life.summary_due(102.0)


def test_nothing_outstanding_at_ac_resends_the_imports_sent_before_the_question() -> None:
    life = lifecycle()
    first = unknown(life, "a@x.co", 100.0)
    life.asking_summary(101.0)
    second = unknown(life, "b@x.co", 101.5)  # sent after the question: may not be counted
    actions = life.summarized(0, 102.0)
    assert actions == [
        Requeue(first.groups[0].changes, STAMP),  # type: ignore[attr-defined]
        *closes(first.import_id, [0], {"a@x.co"}),  # type: ignore[attr-defined]
    ]
    assert life.imports == {second.import_id: second}  # type: ignore[attr-defined]
    assert life.summary_asked_at is None and life.next_summary_at == 107.0


def test_an_import_sent_at_the_moment_of_the_question_counts_as_before_it() -> None:
    life = lifecycle()
    unknown(life, "a@x.co", 100.0)
    life.asking_summary(100.0)
    assert len(life.summarized(0, 101.0)) == 3


def test_imports_still_outstanding_or_an_unanswered_question_keep_waiting() -> None:
    life = lifecycle(timeout=600.0)
    unknown(life, "a@x.co", 100.0)
    life.asking_summary(101.0)
    assert life.summarized(2, 102.0) == []
    life.asking_summary(103.0)
    assert life.summarized(TransientApiError(502, "x"), 104.0) == []
    assert life.summarized(0, 105.0) == []  # no question was asked: the answer proves nothing
    assert life.outstanding() == 1


def test_an_unknown_outcome_waits_past_the_timeout_and_is_sent_again_after_the_give_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    life = lifecycle(timeout=60.0, give_up=120.0)
    imp = unknown(life, "a@x.co", 100.0)
    assert life.summarized(1, 160.5) == []  # past the timeout, imports outstanding: waits
    assert life.summarized(1, 220.0) == []
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="service.pipeline.imports"):
        actions = life.summarized(1, 220.5)
    assert actions == [
        Requeue(imp.groups[0].changes, STAMP, abandoned=True),  # type: ignore[attr-defined]
        *closes(imp.import_id, [0], {"a@x.co"}),  # type: ignore[attr-defined]
    ]
    [record] = caplog.records
    assert record.getMessage().startswith(
        "import outcome still unknown after IMPORT_GIVE_UP_SECONDS; its changes are sent again"
    )
    assert record.__dict__["import"] == imp.import_id  # type: ignore[attr-defined]


def test_a_queued_import_is_not_resent_by_the_summary() -> None:
    life = lifecycle(timeout=1.0)
    imp = queued(life, [group("a@x.co", 0)])
    life.asking_summary(100.0)
    assert life.summarized(0, 500.0) == []
    assert life.imports == {imp.import_id: imp}


def test_either_give_up_is_logged_whole_saying_the_abandoned_import_may_still_land(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given up while AC still processes it, or with its outcome unknown: the error says the
    changes go again and that the import, if it lands later, may undo newer changes."""
    life = lifecycle(timeout=60.0, give_up=120.0)
    processing = queued(life, [group("a@x.co", 0)])
    unknown(life, "b@x.co", 100.0)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="service.pipeline.imports"):
        life.polled(processing.import_id, ImportStatus(False, [], []), 220.5)
        life.summarized(1, 220.5)
    assert [r.getMessage() for r in caplog.records] == [
        "import still processing at AC after IMPORT_GIVE_UP_SECONDS; its changes are sent again "
        "and its emails released (if it lands later, it may undo newer changes)",
        "import outcome still unknown after IMPORT_GIVE_UP_SECONDS; its changes are sent again "
        "and its emails released (if it lands later, it may undo newer changes)",
    ]
    assert life.imports == {}


# ---- a previous owner's imports -------------------------------------------------------------


def test_adopted_intents_block_their_emails_until_the_outcome_is_known() -> None:
    life = lifecycle()
    life.next_summary_at = 500.0
    life.adopt(
        2,
        [Intent("old-1", "b-7", ("a@x.co",), 1.0), Intent("old-2", None, ("b@x.co",), 1.0)],
        {2: 9},
        100.0,
    )
    one, two = life.imports["old-1"], life.imports["old-2"]
    assert one.state is State.QUEUED and one.batch_id == "b-7" and one.adopted
    assert one.next_poll_at == 100.0 and one.started == 100.0
    assert one.emails == {2: ("a@x.co",)} and one.stamp == {2: 9} and one.groups == []
    assert two.state is State.UNKNOWN and two.batch_id is None
    assert life.next_summary_at == 100.0  # asked at once
    assert life.busy_emails() == {"a@x.co", "b@x.co"}
    assert life.polls_due(100.0) == [one]


def test_an_intent_of_queued_import_does_not_hurry_the_summary() -> None:
    life = lifecycle()
    life.next_summary_at = 500.0
    life.adopt(2, [Intent("old-1", "b-7", ("a@x.co",), 1.0)], {2: 9}, 100.0)
    assert life.next_summary_at == 500.0


def test_one_import_adopted_from_several_partitions_is_followed_once() -> None:
    life = lifecycle()
    life.adopt(2, [Intent("old", "b-7", ("a@x.co",), 1.0)], {2: 9}, 100.0)
    stamp = {3: 4}
    life.adopt(3, [Intent("old", "b-7", ("c@x.co",), 1.0)], stamp, 120.0)
    assert life.outstanding() == 1
    imp = life.imports["old"]
    assert imp.emails == {2: ("a@x.co",), 3: ("c@x.co",)} and imp.stamp == {2: 9, 3: 4}
    assert imp.started == 100.0
    stamp[3] = 99
    assert imp.stamp == {2: 9, 3: 4}  # a copy


def test_an_adopted_import_that_landed_settles_its_emails_states() -> None:
    life = lifecycle()
    life.adopt(2, [Intent("old", "b-7", ("a@x.co", "b@x.co"), 1.0)], {2: 9}, 100.0)
    life.adopt(3, [Intent("old", "b-7", ("c@x.co",), 1.0)], {3: 4}, 100.0)
    actions = life.polled("old", ImportStatus(True, ["1", "2"], ["B@x.co"]), 103.0)
    assert actions == [
        Landed(2, ("a@x.co", "b@x.co"), {"b@x.co"}, 9),
        Landed(3, ("c@x.co",), {"b@x.co"}, 4),
        *closes("old", [2, 3], {"a@x.co", "b@x.co", "c@x.co"}),
    ]


def test_an_adopted_import_without_outcome_is_closed_with_nothing_to_resend() -> None:
    life = lifecycle()
    life.adopt(2, [Intent("old", None, ("a@x.co",), 1.0)], {2: 9}, 100.0)
    life.asking_summary(100.0)
    assert life.summarized(0, 101.0) == closes("old", [2], {"a@x.co"})


# ---- rebalance and queries -----------------------------------------------------------------


def test_handed_over_partitions_release_their_emails_and_the_rest_is_followed() -> None:
    life = lifecycle()
    both = queued(life, [group("a@x.co", 0), group("b@x.co", 1)])
    only = ready(life, [group("c@x.co", 1)])
    actions = life.forget({1, 7})
    assert actions == [Release({"b@x.co"}), Release({"c@x.co"})]
    assert life.imports == {both.import_id: both}
    assert both.emails == {0: ("a@x.co",)} and len(both.groups) == 2
    assert only.import_id not in life.imports
    assert life.forget({5}) == []


def test_queries_count_what_is_outstanding() -> None:
    life = lifecycle()
    assert life.outstanding() == 0 and life.contacts() == 0 and life.oldest_age(50.0) == 0.0
    queued(life, [group("a@x.co", 0), group("b@x.co", 1)], now=100.0)
    ready(life, [group("c@x.co", 2)], now=130.0)
    assert life.outstanding() == 2
    assert life.contacts() == 3
    assert life.busy_emails() == {"a@x.co", "b@x.co", "c@x.co"}
    assert life.touches({1}) and life.touches({2, 9}) and not life.touches({3})
    assert life.oldest_age(150.0) == 50.0


@given(
    st.lists(
        st.sampled_from(
            ["ok", "rejected", "refused", "limit", "crash", "5xx", "poll", "done", "summary"]
        ),
        max_size=12,
    )
)
def test_every_import_ends_with_its_intents_deleted_and_its_emails_released(
    steps: list[str],
) -> None:
    """Whatever happens, an import that leaves the lifecycle deletes each of its partitions'
    intents and releases every email it blocked; one that stays keeps them busy."""
    life = lifecycle(timeout=1e9)
    now = 100.0
    emails_of: dict[str, set[str]] = {}
    for n, step in enumerate(steps):
        now += 1.0
        groups = [group(f"a{n}@x.co", 0), group(f"b{n}@x.co", 1)]
        imp = ready(life, groups, now)
        emails_of[imp.import_id] = {g.email for g in groups}
        result: Submitted | BaseException = {
            "ok": Submitted("b", [0, 1], requests=1),
            "rejected": Submitted("b", [1], [0], requests=2),
            "refused": Submitted(None, [0, 1], [], PermanentApiError(422, "x", "y"), 1),
            "limit": Submitted(None, [0, 1], [], RateLimited(60.0, 400), 1),
            "crash": RuntimeError("x"),
            "5xx": Submitted(None, [0, 1], [], TransientApiError(502, "x"), 1),
        }.get(step, Submitted("b", [0, 1], requests=1))
        actions = life.submitted(imp.import_id, result, now, now)
        for other in list(life.imports.values()):
            if step == "done" and other.state is State.QUEUED:
                actions += life.polled(other.import_id, ImportStatus(True, [], []), now)
            if step == "poll" and other.state is State.QUEUED:
                actions += life.polled(other.import_id, ImportStatus(False, [], []), now)
        if step == "summary":
            life.asking_summary(now)
            actions += life.summarized(0, now + 0.5)
        for import_id, emails in list(emails_of.items()):
            deleted = {
                a.partition
                for a in actions
                if isinstance(a, DeleteIntent) and a.intent_id == import_id
            }
            if import_id in life.imports:
                assert not deleted
                assert emails <= life.busy_emails()
            elif deleted:
                assert deleted == {0, 1}
                assert any(isinstance(a, Release) and a.emails == emails for a in actions)
                del emails_of[import_id]
    assert set(emails_of) == set(life.imports)


def test_every_email_ac_reports_as_failed_goes_back() -> None:
    life = lifecycle()
    a, b, c = group("a@x.co", 0), group("b@x.co", 0), group("c@x.co", 0)
    imp = queued(life, [a, b, c])
    actions = life.polled(imp.import_id, ImportStatus(True, [], ["a@x.co", "c@x.co"]), 110.0)
    assert Requeue(a.changes + c.changes, STAMP, force_single=True, not_queued=True) in actions


def test_a_landed_import_of_a_partition_missing_from_its_stamp_is_of_no_generation() -> None:
    life = lifecycle()
    life.adopt(2, [Intent("old", "b-7", ("a@x.co",), 1.0)], {}, 100.0)
    actions = life.polled("old", ImportStatus(True, [], []), 101.0)
    assert actions[0] == Landed(2, ("a@x.co",), set(), -1)


def test_every_intent_of_a_restored_partition_is_adopted() -> None:
    life = lifecycle()
    life.adopt(2, [Intent("old-1", "b-1", ("a@x.co",), 1.0)], {2: 1}, 100.0)
    life.adopt(
        3,
        [Intent("old-1", "b-1", ("b@x.co",), 1.0), Intent("old-2", None, ("c@x.co",), 1.0)],
        {3: 1},
        100.0,
    )
    assert set(life.imports) == {"old-1", "old-2"}
    assert life.busy_emails() == {"a@x.co", "b@x.co", "c@x.co"}


def test_an_import_untouched_by_a_handover_does_not_stop_the_others_being_released() -> None:
    life = lifecycle()
    queued(life, [group("a@x.co", 0)])
    other = queued(life, [group("b@x.co", 1)])
    assert life.forget({1}) == [Release({"b@x.co"})]
    assert other.import_id not in life.imports and life.outstanding() == 1


def test_one_summary_resends_every_unknown_import_sent_before_it() -> None:
    life = lifecycle()
    first = unknown(life, "a@x.co", 100.0)
    second = unknown(life, "b@x.co", 100.5)
    life.asking_summary(101.0)
    actions = life.summarized(0, 102.0)
    assert actions == [
        Requeue(first.groups[0].changes, STAMP),  # type: ignore[attr-defined]
        *closes(first.import_id, [0], {"a@x.co"}),  # type: ignore[attr-defined]
        Requeue(second.groups[0].changes, STAMP),  # type: ignore[attr-defined]
        *closes(second.import_id, [0], {"b@x.co"}),  # type: ignore[attr-defined]
    ]
    assert life.imports == {}


def test_every_unknown_import_past_the_give_up_is_sent_again_at_once() -> None:
    life = lifecycle(timeout=60.0, give_up=90.0)
    first = unknown(life, "a@x.co", 100.0)
    second = unknown(life, "b@x.co", 101.0)
    actions = life.summarized(3, 200.0)  # imports still outstanding: only the give-up speaks
    assert actions == [
        Requeue(first.groups[0].changes, STAMP, abandoned=True),  # type: ignore[attr-defined]
        *closes(first.import_id, [0], {"a@x.co"}),  # type: ignore[attr-defined]
        Requeue(second.groups[0].changes, STAMP, abandoned=True),  # type: ignore[attr-defined]
        *closes(second.import_id, [0], {"b@x.co"}),  # type: ignore[attr-defined]
    ]


def test_a_poll_is_near_while_one_is_in_flight_or_due_within_the_horizon() -> None:
    life = lifecycle()
    assert not life.poll_near(100.0, 2.0)  # nothing outstanding
    imp = queued(life, [group("a@x.co", 0)])  # first poll due at 102.0
    assert not life.poll_near(99.9, 2.0)  # due in 2.1 s
    assert life.poll_near(100.0, 2.0)  # due in exactly 2 s
    assert life.poll_near(103.0, 0.0)  # overdue
    life.polling(imp, 102.0)
    assert life.poll_near(102.0, 0.0)  # in flight: the answer is not in
    life.polled(imp.import_id, ImportStatus(False, [], []), 102.5)  # next at 103.5
    assert not life.poll_near(102.5, 0.5) and life.poll_near(102.5, 1.0)
    other = queued(life, [group("b@x.co", 1)], now=200.0)
    other.batch_id = None  # no batch id (not queued at AC): nothing to poll
    imp.state = State.UNKNOWN  # settled by AC's summary, not by polls
    assert not life.poll_near(1000.0, 1.0)

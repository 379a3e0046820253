"""The budgets' arithmetic, method by method (``service/core/budget.py``): exact figures that
the properties in test_ratelimit.py only bound."""

from __future__ import annotations

import math

import pytest

from service.core.budget import POOL, TOOLS, ImportBudget, LeakyBucket

# ---- LeakyBucket ----------------------------------------------------------------------------


def test_a_bucket_needs_a_positive_rate_and_a_sensible_tools_share() -> None:
    with pytest.raises(ValueError, match=r"^rate must be positive$"):
        LeakyBucket(0)
    with pytest.raises(ValueError, match=r"^tools_every must be 0 \(none\) or at least 2$"):
        LeakyBucket(5, tools_every=1)
    LeakyBucket(0.001, tools_every=2)


def test_a_new_bucket_is_free_at_once_with_the_default_guard() -> None:
    b = LeakyBucket(5)
    assert b.guard == 0.04 and b.interval == pytest.approx(0.24)
    assert b.owned is None and b.total == 0 and b.epoch == 0 and b.tools_every == 0
    assert not b.paused(-1e12)
    assert b.peek(-1e12) == -1e12
    assert b.rate == pytest.approx(1 / 0.24) and b.rate_nominal == pytest.approx(5.0)
    assert b.reserve(3.0) == 3.0 and b.next_free == pytest.approx(3.24)
    assert b.peek(3.0) == pytest.approx(3.24)  # peek books nothing
    assert b.peek(3.0) == pytest.approx(3.24)


def test_the_rate_follows_the_share() -> None:
    b = LeakyBucket(4, guard=0, tools_every=5)
    assert b.rate == pytest.approx(4.0)  # no share: every tick
    b.share(frozenset({TOOLS}), 0)
    assert b.owned == frozenset({TOOLS}) and b.rate == pytest.approx(4 / 5)
    b.share(frozenset({0, 1, 2}), 6)
    assert b.rate == pytest.approx(4 * (4 / 5) * 3 / 6)
    plain = LeakyBucket(4, guard=0)
    plain.share(frozenset({0}), 4)
    assert plain.rate == pytest.approx(1.0)
    plain.share(frozenset({TOOLS}), 4)
    assert plain.rate == 0.0  # no tools ticks at all


def test_a_share_without_a_partition_count_owns_nothing_but_the_tools_keep_theirs() -> None:
    b = LeakyBucket(5, guard=0, tools_every=4)
    b.share(frozenset({0}), -1)
    assert b.owned == frozenset() and b.peek(0.0) == math.inf
    b.share(frozenset({TOOLS}), 0)
    assert b.owned == frozenset({TOOLS})
    assert b.peek(0.0) == pytest.approx(3 * 0.2)
    b.share(None, 0)
    assert b.owned is None and b.peek(0.0) == 0.0


def test_a_share_voids_booked_slots_only_when_it_changes() -> None:
    b = LeakyBucket(5)
    b.share(None, 0)
    assert b.epoch == 0
    b.share(None, 3)
    assert b.epoch == 1
    b.share(frozenset({1}), 3)
    assert b.epoch == 2 and b.total == 3


def test_an_unbooked_peek_never_moves_the_next_slot() -> None:
    b = LeakyBucket(5, guard=0)
    b.share(frozenset(), 3)
    assert b.reserve(1.0) == math.inf
    assert b.next_free == float("-inf")  # nothing booked: an infinite start books nothing


def test_tolerance_is_half_the_slack_the_guard_buys() -> None:
    assert LeakyBucket(5, guard=0.04).tolerance == pytest.approx(5 * 0.04 / 2)
    assert LeakyBucket(5, guard=0).tolerance == math.inf
    assert LeakyBucket(5, guard=-0.01).tolerance == math.inf
    b = LeakyBucket(5, guard=0.04)
    assert b.on_time(10.0, 10.1 + 1e-10)
    assert b.on_time(10.0, 10.1)
    assert not b.on_time(10.0, 10.1 + 1e-8)


def test_tick_owners_skip_the_tools_ticks() -> None:
    b = LeakyBucket(5, tools_every=3)
    b.share(frozenset({0}), 2)
    assert [b.owner(t) for t in range(9)] == [0, 1, TOOLS, 0, 1, TOOLS, 0, 1, TOOLS]
    plain = LeakyBucket(5)
    plain.share(frozenset({0}), 3)
    assert [plain.owner(t) for t in range(5)] == [0, 1, 2, 0, 1]
    nobody = LeakyBucket(5)
    assert [nobody.owner(t) for t in range(3)] == [0, 0, 0]  # total 0: one owner


def test_the_next_owned_tick_is_found_within_one_round() -> None:
    b = LeakyBucket(5, guard=0, tools_every=4)
    b.share(frozenset({2}), 3)
    # ticks: 0->0 1->1 2->2 3->T 4->0 5->1 6->2 7->T 8->0 9->1 10->2 ...
    assert b.peek(0.0) == pytest.approx(0.4)
    assert b.peek(0.41) == pytest.approx(1.2)
    assert b.peek(0.4 + 1e-7) == pytest.approx(0.4)  # within the tick tolerance
    b.share(frozenset({5}), 3)  # a partition that does not exist
    assert b.peek(0.0) == math.inf
    last = LeakyBucket(5, guard=0, tools_every=4)
    last.share(frozenset({TOOLS}), 3)
    assert last.peek(0.0) == pytest.approx(0.6)


def test_a_partition_owning_the_last_tick_of_a_long_round_is_found() -> None:
    b = LeakyBucket(5, guard=0, tools_every=2)
    b.share(frozenset({3}), 4)
    # tick t: odd ones are the tools', even ones go to partitions 0,1,2,3 in turn
    assert round(b.peek(0.0) / 0.2) == 6
    assert round(b.peek(6 * 0.2 + 0.01) / 0.2) == 14


def test_a_pause_moves_the_next_slot_and_voids_booked_ones() -> None:
    b = LeakyBucket(5, guard=0)
    b.reserve(0.0)
    b.pause(10.0)
    assert (b.paused_until, b.next_free, b.epoch) == (10.0, 10.0, 1)
    assert b.paused(9.99) and not b.paused(10.0)
    b.pause(10.0)  # the same pause again changes nothing
    assert b.epoch == 1
    b.reserve(20.0)
    b.pause(15.0)  # longer than the last pause, ending before the next booked slot
    assert b.epoch == 2 and b.paused_until == 15.0 and b.next_free == pytest.approx(20.2)
    b.pause(30.0)
    assert b.next_free == 30.0 and b.epoch == 3


# ---- ImportBudget ---------------------------------------------------------------------------


def test_the_import_budget_keeps_a_margin_below_acs_figure() -> None:
    with pytest.raises(ValueError, match=r"^per_minute must be at least 1$"):
        ImportBudget(per_minute=0)
    assert ImportBudget(per_minute=100).per_minute == 98
    assert ImportBudget(per_minute=1).per_minute == 1
    assert ImportBudget(per_minute=10, margin=0).per_minute == 10
    budget = ImportBudget()
    assert budget.window == 60.5 and budget.in_flight == 60.0
    assert budget.capacity == 98 and budget.left(0.0) == 98.0
    assert budget.adopted(POOL) and not budget.adopted(0)
    assert budget.history(POOL, 0.0) == []


def test_a_charge_counts_for_a_window_from_when_its_request_returned() -> None:
    budget = ImportBudget(per_minute=3, margin=0, window=60.0, skew=0.0, in_flight=30.0)
    first, charged = budget.take(100.0)
    assert (first, charged) == (1, [POOL])
    assert budget.history(POOL, 100.0) == [(130.0, 1.0)]  # unsettled: dated ahead
    assert budget.settle(first, 101.0) == [POOL]
    assert budget.history(POOL, 101.0) == [(101.0, 1.0)]
    assert budget.settle(99, 101.0) == []
    assert budget.left(160.99) == 2.0
    assert budget.left(161.0) == 3.0  # a window later it is gone
    assert budget.history(POOL, 161.0) == []


def test_an_overrun_is_charged_too() -> None:
    budget = ImportBudget(per_minute=1, margin=0)
    assert budget.take(0.0) == (1, [POOL])
    assert not budget.available(0.0) and budget.left(0.0) == 0.0
    assert budget.take(0.0) == (2, [POOL])  # AC counted it: charged although nothing was left
    assert [units for _, units in budget.history(POOL, 0.0)] == [1.0, 1.0]
    assert budget.left(0.0) == 0.0  # never negative


def test_a_shared_import_is_paid_by_the_owned_partitions_with_most_left() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.share(frozenset({0, 1}), 4)
    assert budget.owned == frozenset({0, 1}) and budget.total == 4
    assert not budget.adopted(POOL) and budget.capacity == 5
    assert not budget.available(0.0) and budget.left(0.0) == 0.0  # nothing adopted yet
    budget.adopt(0, [(0.0, 1.5)])  # 1.5 imports = 6 units of 10
    budget.adopt(1, [])
    assert budget.adopted(0) and budget.adopted(1)
    assert budget.left(0.0) == pytest.approx((4 + 10) / 4)
    assert budget.take(0.0) == (1, [1])  # partition 1 has 10 left: pays all 4
    assert budget.take(0.0) == (2, [1])  # 6 left
    assert budget.take(0.0) == (3, [0])  # now partition 0 has most left (4 against 2)
    assert budget.available(0.0) is False  # 2 units left, an import costs 4
    # an overrun: the 2 units partition 1 has, and the rest charged to it as well
    assert budget.take(0.0) == (4, [1])
    assert budget.history(1, 0.0) == [(60.0, 1.0), (60.0, 1.0), (60.0, 0.5), (60.0, 0.5)]
    assert budget.history(0, 0.0) == [(0.0, 1.5), (60.0, 1.0)]


def test_equal_partitions_are_charged_lowest_first() -> None:
    budget = ImportBudget(per_minute=8, margin=0)
    budget.share(frozenset({2, 1}), 2)
    budget.adopt(1, [])
    budget.adopt(2, [])
    assert budget.take(0.0) == (1, [1])
    assert budget.take(0.0) == (2, [2])


def test_adopted_imports_are_rounded_up_to_whole_units() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.share(frozenset({0}), 3)
    budget.adopt(0, [(5.0, 1 / 3), (6.0, 0.5)])
    assert [units for _, units, _ in budget._history[0]] == [1.0, 2.0]
    assert budget.history(0, 6.0) == [(5.0, pytest.approx(1 / 3)), (6.0, pytest.approx(2 / 3))]


def test_a_new_partition_count_rescales_the_units_held() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.share(frozenset({0, 1}), 2)
    budget.adopt(0, [(0.0, 1.0)])  # 2 units of 2
    budget.share(frozenset({0, 1}), 4)
    assert budget.history(0, 0.0) == [(0.0, pytest.approx(1.0))]  # still one import
    assert budget._history[0][0][1] == pytest.approx(4.0)
    budget.share(frozenset({0}), 4)  # partition 1 handed over: forgotten
    assert not budget.adopted(1) and budget.history(1, 0.0) == []
    assert budget.adopted(0)


def test_back_to_one_pool_keeps_its_history() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.take(0.0)
    budget.share(None, 0)
    assert budget.owned is None and budget.total == 1 and budget.adopted(POOL)
    assert budget.history(POOL, 0.0) == [(60.0, 1.0)]
    budget.share(frozenset({0}), 0)  # no partition count: one pool again
    assert budget.owned is None and budget.history(POOL, 0.0) == [(60.0, 1.0)]
    budget.share(frozenset({0}), 2)
    assert budget.history(POOL, 0.0) == [] and not budget.adopted(POOL)
    budget.share(None, 5)
    assert budget.adopted(POOL) and budget.history(POOL, 0.0) == []
    assert budget.left(0.0) == 10.0


def test_settle_dates_every_part_of_a_split_charge() -> None:
    budget = ImportBudget(per_minute=4, margin=0)
    budget.share(frozenset({0, 1}), 2)
    budget.adopt(0, [(0.0, 1.5)])  # 3 of 4 units used
    budget.adopt(1, [(0.0, 1.5)])
    charge, charged = budget.take(1.0)
    assert charged == [0, 1]
    assert sorted(budget.settle(charge, 2.0)) == [0, 1]
    assert budget.history(0, 2.0)[-1][0] == 2.0 and budget.history(1, 2.0)[-1][0] == 2.0


def test_a_pause_holds_every_import_and_never_shortens() -> None:
    budget = ImportBudget()
    budget.pause(100.0)
    budget.pause(50.0)
    assert budget.paused_until == 100.0
    assert not budget.available(99.99) and budget.available(100.0)
    assert budget.left(0.0) == 98.0  # a pause aside


def test_expired_charges_are_forgotten() -> None:
    budget = ImportBudget(per_minute=5, margin=0, window=60.0, skew=0.0)
    for _ in range(3):
        budget.settle(budget.take(0.0)[0], 0.0)
    assert len(budget._history[POOL]) == 3
    assert budget.left(60.0) == 5.0
    assert budget._history[POOL] == []  # memory stays bounded


def test_a_partition_given_up_must_be_adopted_again_when_it_comes_back() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.share(frozenset({0, 1}), 2)
    budget.adopt(0, [])
    budget.adopt(1, [])
    budget.share(frozenset({0}), 2)
    assert not budget.adopted(1) and budget.adopted(0)
    budget.share(frozenset({0, 1}), 2)
    assert not budget.adopted(1)  # its next history is in the ledger, not here
    assert budget.left(0.0) == pytest.approx(10 / 2)


def test_one_partition_of_one_is_a_share_not_a_pool() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.share(frozenset({0}), 1)
    assert budget.owned == frozenset({0}) and not budget.available(0.0)
    bucket = LeakyBucket(5, guard=0)
    bucket.share(frozenset({0}), 1)
    assert bucket.owned == frozenset({0}) and bucket.peek(0.0) == 0.0


def test_a_pool_regained_takes_charges_again() -> None:
    budget = ImportBudget(per_minute=10, margin=0)
    budget.share(frozenset({0}), 2)
    budget.share(None, 0)
    assert budget.take(0.0) == (1, [POOL])
    assert budget.history(POOL, 0.0) == [(60.0, 1.0)]

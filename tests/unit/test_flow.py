"""Back-pressure: ``decide`` (pure), ``Pauses`` (the reasons a partition is paused) and the
stage that releases held changes whose record cannot come (``BackPressure``)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service.core.coalesce import Coalescer, ListRef
from service.core.model import Action, MembershipEvent
from service.metrics import Metrics
from service.pipeline.backpressure import BackPressure
from service.pipeline.flow import Bounds, Decision, Load, Pauses, decide
from service.pipeline.ownership import Ownership

BOUNDS = Bounds(max_changes=100, max_tracked=1000, max_bytes=10_000)
OWNED = frozenset({0, 1, 2, 3})  # a fair share of tracked offsets: 250 each


def load(changes: int = 0, tracked: dict[int, int] | None = None, held: int = 0) -> Load:
    return Load(changes, tracked or {}, held)


def test_nothing_held_pauses_nothing() -> None:
    assert decide(load(), BOUNDS, frozenset(), OWNED) == Decision(frozenset(), frozenset())


def test_each_bound_reached_pauses_every_owned_partition() -> None:
    for over in (load(changes=100), load(tracked={0: 1000}), load(held=10_000)):
        assert decide(over, BOUNDS, frozenset(), OWNED).pause == OWNED, over
    for under in (load(changes=99), load(tracked={0: 100, 1: 100}), load(held=9_999)):
        assert decide(under, BOUNDS, frozenset(), OWNED).pause == frozenset(), under


def test_a_partition_over_its_fair_share_of_tracked_offsets_is_paused_alone() -> None:
    decision = decide(load(tracked={1: 250, 2: 249}), BOUNDS, frozenset(), OWNED)
    assert decision == Decision(frozenset({1}), frozenset())


def test_the_fair_share_is_the_tracked_bound_split_over_owned_partitions() -> None:
    # one partition owned: its share is the whole bound (then the replica is over anyway)
    assert decide(load(tracked={0: 999}), BOUNDS, frozenset(), frozenset({0})).pause == frozenset()
    # nothing owned: nothing to pause, whatever the load
    assert decide(load(changes=500), BOUNDS, frozenset(), frozenset()) == Decision(
        frozenset(), frozenset()
    )
    # a share never rounds down to zero: a tiny bound still lets an empty partition run
    tiny = Bounds(max_changes=100, max_tracked=2, max_bytes=100)
    assert decide(load(), tiny, frozenset(), frozenset(range(5))).pause == frozenset()
    assert decide(load(tracked={3: 1}), tiny, frozenset(), frozenset(range(5))).pause == {3}


def test_a_paused_replica_resumes_only_once_every_load_is_back_under_half() -> None:
    paused = OWNED
    for still in (load(changes=51), load(tracked={0: 501}), load(held=5_001)):
        assert decide(still, BOUNDS, paused, OWNED) == Decision(frozenset(), frozenset()), still
    half = load(changes=50, tracked={0: 125, 1: 125, 2: 125, 3: 125}, held=5_000)
    assert decide(half, BOUNDS, paused, OWNED) == Decision(frozenset(), OWNED)


def test_a_paused_partition_resumes_only_once_under_half_its_share() -> None:
    paused = frozenset({2})
    assert decide(load(tracked={2: 126}), BOUNDS, paused, OWNED).resume == frozenset()
    assert decide(load(tracked={2: 125}), BOUNDS, paused, OWNED).resume == {2}


def test_only_owned_partitions_are_paused_or_resumed() -> None:
    paused = frozenset({0, 9})  # 9 was revoked while paused
    decision = decide(load(changes=100), BOUNDS, paused, OWNED)
    assert decision == Decision(frozenset({1, 2, 3}), frozenset())
    assert decide(load(), BOUNDS, paused, OWNED) == Decision(frozenset(), frozenset({0}))


@given(
    st.integers(0, 200),
    st.dictionaries(st.integers(0, 3), st.integers(0, 1200), max_size=4),
    st.integers(0, 20_000),
    st.frozensets(st.integers(0, 5)),
)
def test_a_decision_pauses_what_is_running_and_resumes_what_is_paused(
    changes: int, tracked: dict[int, int], held: int, paused: frozenset[int]
) -> None:
    decision = decide(load(changes, tracked, held), BOUNDS, paused, OWNED)
    assert decision.pause <= OWNED - paused
    assert decision.resume <= OWNED & paused
    over = changes >= 100 or sum(tracked.values()) >= 1000 or held >= 10_000
    if over:
        assert decision.pause | (paused & OWNED) == OWNED and not decision.resume


class FakeConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []

    def pause(self, partitions: list[object]) -> None:
        self.calls.append(("pause", [(tp.topic, tp.partition) for tp in partitions]))  # type: ignore[attr-defined]

    def resume(self, partitions: list[object]) -> None:
        self.calls.append(("resume", [(tp.topic, tp.partition) for tp in partitions]))  # type: ignore[attr-defined]


def test_a_partition_is_paused_once_and_resumed_when_its_last_reason_goes() -> None:
    consumer = FakeConsumer()
    pauses = Pauses("t", consumer)
    pauses.hold(3, "backpressure")
    pauses.hold(3, "restore")
    assert consumer.calls == [("pause", [("t", 3)])]
    assert pauses.held("restore") == {3} and pauses.held("schema") == frozenset()
    assert pauses.paused() == 1
    pauses.release(3, "schema")  # not a reason it holds: nothing happens
    pauses.release(3, "backpressure")
    assert consumer.calls == [("pause", [("t", 3)])]
    assert pauses.held("backpressure") == frozenset() and pauses.held("restore") == {3}
    pauses.release(3, "restore")
    assert consumer.calls == [("pause", [("t", 3)]), ("resume", [("t", 3)])]
    assert pauses.paused() == 0 and pauses.reasons == {}
    pauses.release(3, "restore")  # released twice: no second resume
    pauses.release(4, "restore")  # never held
    assert len(consumer.calls) == 2


def test_forgotten_partitions_keep_no_reason_and_others_stay_paused() -> None:
    consumer = FakeConsumer()
    pauses = Pauses("t", consumer)
    pauses.hold(1, "restore")
    pauses.hold(2, "restore")
    pauses.forget({1, 7})
    assert pauses.held("restore") == {2} and pauses.paused() == 1
    pauses.hold(1, "restore")  # assigned again: paused again
    assert consumer.calls[-1] == ("pause", [("t", 1)])


def test_a_fair_share_is_a_whole_number_of_offsets() -> None:
    three = frozenset({0, 1, 2})  # 1000 // 3 = 333
    assert decide(load(tracked={1: 333}), BOUNDS, frozenset(), three).pause == {1}
    assert decide(load(tracked={1: 332}), BOUNDS, frozenset(), three).pause == frozenset()


# ---- BackPressure: held changes released when their record cannot come ----------------------


class _Tracker:
    def __init__(self, outstanding: dict[int, int]) -> None:
        self.counts = outstanding

    def outstanding(self, partition: int) -> int:
        return self.counts.get(partition, 0)


class _Dispatcher:
    def changes_in_flight(self) -> int:
        return 0


class _Delivery:
    def __init__(self, idle: bool) -> None:
        self._idle = idle

    def pending(self) -> int:
        return 0

    def idle(self) -> bool:
        return self._idle


class _Consumer:
    def pause(self, partitions: object) -> None:
        pass

    def resume(self, partitions: object) -> None:
        pass


def _held_stage(
    tracked: dict[int, int], *, idle: bool, reason: str = "backpressure", max_changes: int = 1000
) -> tuple[BackPressure, Coalescer]:
    """Partitions 0 and 1 owned, a change of partition 0 held for a later record, partition 0
    paused for ``reason``; partition 1 has a queued change."""
    coalescer = Coalescer(window=5)
    coalescer.add(0, ListRef("A"), _event("x@y.com"), None, 0, now=0, hold=True)
    coalescer.add(1, ListRef("A"), _event("z@y.com"), None, 0, now=0)
    ownership = Ownership()
    ownership.assign([0, 1])
    pauses = Pauses("t", _Consumer())
    pauses.hold(0, reason)
    stage = BackPressure(
        Bounds(max_changes=max_changes, max_tracked=200, max_bytes=10**9),
        ownership,
        pauses,
        _Tracker(tracked),  # type: ignore[arg-type]
        coalescer,
        _Dispatcher(),  # type: ignore[arg-type]
        _Delivery(idle),  # type: ignore[arg-type]
        Metrics(CollectorRegistry()),
    )
    return stage, coalescer


def _event(email: str) -> MembershipEvent:
    return MembershipEvent("e", 0, email, "aud", "A", Action.ENTERED)


def test_a_partition_paused_for_its_own_share_releases_its_holds_at_once() -> None:
    # Partition 0 holds over half its share of the tracked offsets (51 of 100, 200 over two
    # partitions): ``decide`` keeps it paused until they fall to half, and its held change
    # keeps its commit point back, so waiting would only grow them.
    stage, coalescer = _held_stage({0: 51, 1: 5}, idle=False)
    stage.apply()
    assert coalescer.held_partitions() == []
    assert coalescer.next_due_at() == 5  # queued by the due it was added with


def test_a_partition_paused_with_the_replica_keeps_its_holds_while_work_is_on_its_way() -> None:
    # Pending changes at a bound of one: every partition paused, and work on its way
    # (an import outstanding) may still lower the load, so partition 0's hold waits.
    stage, coalescer = _held_stage({0: 50, 1: 5}, idle=False, max_changes=1)
    stage.apply()
    assert stage.pauses.held("backpressure") == {0, 1}
    assert coalescer.held_partitions() == [0]
    # Nothing left on its way: the hold alone keeps the load at the bound. It goes.
    stage.delivery = _Delivery(idle=True)  # type: ignore[assignment]
    coalescer.take_due(100, limit=10, busy=set())  # partition 1's change is taken
    stage.apply()
    assert coalescer.held_partitions() == []


def test_a_partition_paused_for_another_reason_releases_its_holds() -> None:
    stage, coalescer = _held_stage({0: 10, 1: 5}, idle=False, reason="schema")
    stage.apply()
    assert coalescer.held_partitions() == []


def test_a_flowing_partition_keeps_its_holds_even_when_nothing_else_is_queued() -> None:
    stage, coalescer = _held_stage({0: 10, 1: 5}, idle=True)
    stage.pauses.release(0, "backpressure")
    coalescer.take_due(100, limit=10, busy=set())  # partition 1's change is taken
    stage.apply()
    assert coalescer.held_partitions() == [0]  # its record is on its way: it flows

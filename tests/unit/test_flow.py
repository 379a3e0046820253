"""Back-pressure: ``decide`` (pure) and ``Pauses`` (the reasons a partition is paused)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from service.pipeline.flow import Bounds, Decision, Load, Pauses, decide

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

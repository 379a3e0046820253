from hypothesis import given
from hypothesis import strategies as st

from service.core.offsets import OffsetTracker


def test_commits_first_not_done() -> None:
    t = OffsetTracker()
    for o in range(10, 15):
        t.track(0, o)
    assert t.committable() == {0: 10}
    t.complete(0, 11)
    t.complete(0, 12)
    assert t.committable() == {0: 10}
    t.complete(0, 10)
    assert t.committable() == {0: 13}
    t.complete(0, 14)
    t.complete(0, 13)
    assert t.committable() == {0: 15}


def test_gaps_in_offsets_are_fine() -> None:
    t = OffsetTracker()
    t.track(0, 3)
    t.track(0, 7)  # compacted topic or transaction markers
    t.complete(0, 3)
    assert t.committable() == {0: 7}
    t.complete(0, 7)
    assert t.committable() == {0: 8}


def test_repeated_offset_is_refused() -> None:
    t = OffsetTracker()
    assert t.track(0, 5)
    assert not t.track(0, 5)
    assert not t.track(0, 4)


def test_dropped_partition_never_reported_and_completions_ignored() -> None:
    t = OffsetTracker()
    t.track(0, 1)
    t.track(1, 1)
    t.drop([1])
    t.complete(1, 1)
    assert t.committable() == {0: 1}


def test_completion_of_untracked_offset_is_ignored() -> None:
    t = OffsetTracker()
    t.track(0, 5)
    t.complete(0, 9)
    t.complete(0, 2)
    assert t.committable() == {0: 5}


@given(
    st.lists(st.integers(0, 2), min_size=1, max_size=60),
    st.randoms(use_true_random=False),
)
def test_committable_never_passes_an_unconfirmed_offset(partitions: list[int], rnd) -> None:  # type: ignore[no-untyped-def]
    t = OffsetTracker()
    next_offset = {0: 0, 1: 100, 2: 7}
    polled: list[tuple[int, int]] = []
    for p in partitions:
        t.track(p, next_offset[p])
        polled.append((p, next_offset[p]))
        next_offset[p] += rnd.choice([1, 1, 2])
    order = polled[:]
    rnd.shuffle(order)
    done: set[tuple[int, int]] = set()
    for p, o in order:
        t.complete(p, o)
        done.add((p, o))
        for part, commit in t.committable().items():
            not_done = [off for (pp, off) in polled if pp == part and (pp, off) not in done]
            if not_done:
                assert commit <= min(not_done)
            assert all((part, off) in done for (pp, off) in polled if pp == part and off < commit)
    for part, commit in t.committable().items():
        assert commit == max(off for (pp, off) in polled if pp == part) + 1

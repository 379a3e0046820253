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


def test_a_completion_before_the_offset_is_polled_does_not_count() -> None:
    t = OffsetTracker()
    t.track(0, 5)
    t.complete(0, 6)  # not polled yet: ignored, not remembered
    t.track(0, 6)
    t.complete(0, 5)
    assert t.committable() == {0: 6}
    assert t.outstanding(0) == 1


def test_the_head_offset_itself_can_be_completed() -> None:
    t = OffsetTracker()
    t.track(0, 5)
    t.complete(0, 5)
    assert t.committable() == {0: 6}


def test_a_late_completion_after_everything_was_committed_is_ignored() -> None:
    t = OffsetTracker()
    t.track(0, 5)
    t.complete(0, 5)
    assert t.committable() == {0: 6}
    t.complete(0, 5)  # a duplicate outcome, after the head moved past it
    t.complete(0, 4)
    assert t.committable() == {0: 6}
    t.track(0, 6)
    t.complete(0, 4)  # older than every tracked offset
    assert t.committable() == {0: 6}
    assert len(t) == 1


def test_a_partition_with_nothing_tracked_is_never_reported() -> None:
    """A refused offset (here an invalid one, below any real offset) tracks nothing: the
    partition has no commit point, and the partitions after it are still reported."""
    t = OffsetTracker()
    assert not t.track(1, -1001)
    t.track(0, 3)
    t.track(2, 0)
    assert t.committable() == {0: 3, 2: 0}
    assert t.outstanding(1) == 0 and len(t) == 2


def test_dropping_a_partition_never_tracked_is_harmless() -> None:
    t = OffsetTracker()
    t.track(0, 1)
    t.drop({7})
    t.drop([0, 0])
    assert t.committable() == {} and len(t) == 0


def test_distance_counts_how_far_an_offset_is_past_the_commit_point() -> None:
    t = OffsetTracker()
    assert t.distance(3, 40) == 40  # untracked partition: the offset itself
    for o in (10, 11, 13):
        t.track(0, o)
    assert t.distance(0, 10) == 0  # holds the commit back
    assert t.distance(0, 13) == 3
    assert t.distance(0, 9) == 0  # never negative
    t.complete(0, 10)
    assert t.distance(0, 13) == 2  # the head moved on to 11
    t.complete(0, 11)
    t.complete(0, 13)
    assert t.distance(0, 20) == 6  # all done: counted from last tracked + 1
    assert t.distance(1, 0) == 0


def test_outstanding_and_len_count_tracked_offsets_not_yet_committable() -> None:
    t = OffsetTracker()
    assert t.outstanding(0) == 0 and len(t) == 0
    for o in range(5):
        t.track(0, o)
    t.track(1, 100)
    assert t.outstanding(0) == 5 and t.outstanding(1) == 1 and len(t) == 6
    t.complete(0, 0)
    t.complete(0, 1)
    t.complete(0, 3)
    assert t.outstanding(0) == 3  # 2, 3 and 4: 3 is done but behind 2
    assert len(t) == 4
    t.complete(1, 100)
    assert t.outstanding(1) == 0 and len(t) == 3


@given(
    st.lists(st.integers(0, 2), min_size=1, max_size=40),
    st.randoms(use_true_random=False),
)
def test_outstanding_and_distance_agree_with_the_commit_point(
    partitions: list[int],
    rnd,  # type: ignore[no-untyped-def]
) -> None:
    t = OffsetTracker()
    next_offset = dict.fromkeys(range(3), 0)
    polled: list[tuple[int, int]] = []
    for p in partitions:
        assert t.track(p, next_offset[p])
        polled.append((p, next_offset[p]))
        next_offset[p] += rnd.choice([1, 2])
    done = set(rnd.sample(polled, rnd.randint(0, len(polled))))
    for p, o in done:
        t.complete(p, o)
    commit = t.committable()
    for p in set(partitions):
        mine = [o for pp, o in polled if pp == p]
        not_committable = [o for o in mine if o >= commit[p]]
        assert t.outstanding(p) == len(not_committable)
        for o in mine:
            assert t.distance(p, o) == max(0, o - commit[p])
    assert len(t) == sum(t.outstanding(p) for p in range(3))


def test_a_long_window_with_gaps_agrees_with_a_plain_model_as_it_shifts_down() -> None:
    """Ten thousand offsets with gaps, completed out of order: the byte-per-offset window (shifted
    down once the head is 4,096 entries in) answers what a list of offsets and a set would."""
    import random

    rnd = random.Random(14)
    tracker = OffsetTracker()
    offsets: list[int] = []
    offset = 1_000_000
    for _ in range(10_000):
        offset += rnd.choice([1, 1, 1, 2, 7])  # transaction markers and the like: gaps
        assert tracker.track(0, offset)
        offsets.append(offset)
    done: set[int] = set()
    order: list[int] = []
    for start in range(0, len(offsets), 64):  # roughly in order, so the head moves along
        chunk = offsets[start : start + 64]
        rnd.shuffle(chunk)
        order += chunk
    for step, completed in enumerate(order):
        tracker.complete(0, completed)
        done.add(completed)
        if step % 97 == 0 or step == len(order) - 1:
            first = next((o for o in offsets if o not in done), offsets[-1] + 1)
            assert tracker.committable() == {0: first}
            assert tracker.outstanding(0) == sum(1 for o in offsets if o >= first)
            assert tracker.distance(0, offsets[-1]) == max(0, offsets[-1] - first)
    assert len(tracker) == 0
    assert tracker.track(0, offsets[-1] + 50)  # a new window after everything was done
    assert tracker.committable() == {0: offsets[-1] + 50}


def test_the_window_does_not_keep_what_was_committed() -> None:
    """Memory: a partition that keeps up holds bytes for its outstanding offsets only."""
    from service.core.offsets import COMPACT_AFTER

    tracker = OffsetTracker()
    tracker.track(0, 0)  # held back: the window may not restart empty
    for offset in range(1, 100_000):
        tracker.track(0, offset)
    tracker.complete(0, 0)
    for offset in range(1, 99_000):
        tracker.complete(0, offset)
        if offset % 1000 == 0:
            tracker.committable()
    assert tracker.committable() == {0: 99_000}
    held = len(tracker._partitions[0].states)  # the memory is the point
    assert held <= 1_000 + 2 * COMPACT_AFTER, held
